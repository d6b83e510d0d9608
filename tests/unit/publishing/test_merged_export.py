"""The merged export's engine arguments and its registration as a version linked to the adapter version."""

from __future__ import annotations

from pathlib import Path

from npu_sft.engine import EngineSettings, export_command
from npu_sft.publishing.adapter_model import AdapterFacts, log_adapter_model
from npu_sft.publishing.merged_export import MERGED_VERSION_TAG, export_config, register_merged
from npu_sft.publishing.registry import CHAMPION
from npu_sft.publishing.versions import register_version
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import RunTracker

FACTS = AdapterFacts("qwen/Qwen1.5-7B", "abc123", "qwen", "data-key")


def test_export_merges_on_the_cpu_into_safetensors_shards(tmp_path: Path, engine_python: Path) -> None:
    config = export_config(Path("/m/base"), Path("/r/adapter"), "qwen", tmp_path / "merged", shard_size_gb=2)
    assert config == {
        "model_name_or_path": "/m/base", "adapter_name_or_path": "/r/adapter", "template": "qwen",
        "finetuning_type": "lora", "export_dir": str(tmp_path / "merged"), "export_size": 2, "export_device": "cpu",
        "export_legacy_format": False,
    }
    command = export_command(EngineSettings(python=str(engine_python)), tmp_path / "export.yaml")
    assert command.argv == [str(engine_python), "-m", "llamafactory.cli", "export", str(tmp_path / "export.yaml")]


def test_the_merged_model_is_registered_once_as_champion_and_linked_to_its_adapter(tmp_path: Path) -> None:
    mlflow = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            artifact_location=str(tmp_path / "artifacts"), experiment="merge")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"weights")
    tracker = RunTracker.start(mlflow, run_name="r", tags={})
    adapter_version = register_version(tracker, "lora", log_adapter_model(tracker, adapter, FACTS, {}), FACTS)
    reference = register_merged(tracker, merged, "lora-merged", "lora", adapter_version, FACTS)
    assert reference == "lora-merged/1"
    client = tracker.client
    version = client.get_model_version_by_alias("lora-merged", CHAMPION)
    assert str(version.version) == "1" and version.run_id == tracker.run_id
    assert version.tags["adapter.model"] == "lora" and version.tags["adapter.version"] == adapter_version
    assert version.tags["base_model.revision"] == "abc123"
    assert client.get_model_version("lora", adapter_version).tags[MERGED_VERSION_TAG] == reference
    assert register_merged(tracker, merged, "lora-merged", "lora", adapter_version, FACTS) == reference
    assert len(client.search_model_versions("name='lora-merged'")) == 1

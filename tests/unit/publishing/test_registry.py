"""Registered adapter versions: lookups by version, alias and run, the adapter download, version tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from npu_sft.publishing import registry
from npu_sft.publishing.adapter_model import AdapterFacts, log_adapter_model
from npu_sft.publishing.errors import RegistryError
from npu_sft.publishing.versions import register_version
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import RunTracker, client_for

MODEL = "tiny-qwen2-lora"
FACTS = AdapterFacts("tiny (seed 0)", "", "qwen", "data-key")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MlflowSettings:
    """An MLflow store with two registered versions of MODEL, made the way the sft flow's publish task makes them."""
    root = tmp_path_factory.mktemp("registry")
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_location=str(root / "artifacts"), experiment="t"
    )
    for weights in (b"v1", b"v2"):
        adapter = root / f"adapter-{weights.decode()}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (adapter / "adapter_model.safetensors").write_bytes(weights)
        tracker = RunTracker.start(settings, run_name="r", tags={})
        model_id = log_adapter_model(tracker, adapter, FACTS, {})
        register_version(tracker, MODEL, model_id, FACTS)
    return settings


def test_latest_is_the_highest_version(store: MlflowSettings) -> None:
    assert registry.resolve_version(store, MODEL, "latest") == "2"
    assert registry.resolve_version(store, MODEL, "1") == "1"


def test_an_alias_names_the_version_the_publish_gate_promoted(store: MlflowSettings) -> None:
    with pytest.raises(RegistryError, match="no version with alias 'champion' \\(no version has passed the publish gate"):
        registry.resolve_version(store, MODEL, "champion")
    client_for(store).set_registered_model_alias(MODEL, "champion", "1")
    try:
        assert registry.resolve_version(store, MODEL, "champion") == "1"
        assert registry.resolve_version(store, MODEL, "@champion") == "1"
    finally:
        client_for(store).delete_registered_model_alias(MODEL, "champion")


def test_a_run_names_the_version_published_from_it(store: MlflowSettings) -> None:
    first = client_for(store).get_model_version(MODEL, "1").run_id
    assert registry.resolve_version(store, MODEL, f"runs:/{first}") == "1"
    assert registry.resolve_version(store, MODEL, f"runs:/{first}/adapter") == "1"
    unpublished = r"^run 0+ published no version of 'tiny-qwen2-lora' in .* \(publish.enabled was false"
    with pytest.raises(RegistryError, match=unpublished):
        registry.resolve_version(store, MODEL, "runs:/" + "0" * 32)
    with pytest.raises(RegistryError, match="is not an MLflow run id"):
        registry.resolve_version(store, MODEL, "runs:/x' or name='y")


def test_missing_versions_and_models_are_clear_errors(store: MlflowSettings) -> None:
    with pytest.raises(RegistryError, match="no version 9"):
        registry.resolve_version(store, MODEL, "9")
    with pytest.raises(RegistryError, match="run the sft flow first"):
        registry.resolve_version(store, "never-trained", "latest")


def test_download_puts_the_versions_adapter_in_place_once(store: MlflowSettings, tmp_path: Path) -> None:
    dest = tmp_path / f"{MODEL}-v1"
    assert registry.download_version(store, MODEL, "1", dest) == dest
    assert (dest / "adapter_model.safetensors").read_bytes() == b"v1"
    (dest / "adapter_model.safetensors").write_bytes(b"local")  # a second call must not download again
    registry.download_version(store, MODEL, "1", dest)
    assert (dest / "adapter_model.safetensors").read_bytes() == b"local"
    assert not dest.with_name(dest.name + ".partial").exists()


def test_tagging_a_version(store: MlflowSettings) -> None:
    registry.tag_version(store, MODEL, "2", "npu_sft.smoke_reply", "hello")
    version = client_for(store).get_model_version(MODEL, "2")
    assert version.tags["npu_sft.smoke_reply"] == "hello"

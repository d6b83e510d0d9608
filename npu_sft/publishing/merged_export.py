"""The champion merged into its base model with LLaMA-Factory's `export` (safetensors shards), for serving engines
without LoRA support; registered as a version of its own model that names the adapter version it came from."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from npu_sft.engine import EngineSettings, export_command, process
from npu_sft.publishing.adapter_model import AdapterFacts, note_version
from npu_sft.publishing.errors import PublishError
from npu_sft.publishing.registry import CHAMPION
from npu_sft.publishing.settings import MergedExportSettings
from npu_sft.tracking import RunTracker

LOGGED_MODEL_NAME = "merged"
MODEL_TYPE = "merged-lora"
MERGED_VERSION_TAG = "merged.version"  # on the adapter version: the merged model's version made from it
MERGED_DESCRIPTION = (
    "Base models with an npu-sft LoRA adapter merged in, for serving engines without LoRA support. Each version's "
    "tags `adapter.model` and `adapter.version` name the adapter version it was made from."
)


def export_config(base_model: Path, adapter_dir: Path, template: str, export_dir: Path, shard_size_gb: int) -> dict:
    """LLaMA-Factory's export arguments: merged on the CPU (no device lease; needs the model's size in host RAM)."""
    return {
        "model_name_or_path": str(base_model),
        "adapter_name_or_path": str(adapter_dir),
        "template": template,
        "finetuning_type": "lora",
        "export_dir": str(export_dir),
        "export_size": shard_size_gb,
        "export_device": "cpu",
        "export_legacy_format": False,
    }


def export_merged(
    engine: EngineSettings,
    base_model: Path,
    adapter_dir: Path,
    template: str,
    out_dir: Path,
    shard_size_gb: int,
    *,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """The merged model in `out_dir`, which appears only once the export completed."""
    if any(out_dir.glob("*.safetensors")):
        return out_dir  # a retried task: exported before
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config_file = out_dir.with_name(out_dir.name + ".export.yaml")
    config = export_config(base_model, adapter_dir, template, partial, shard_size_gb)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    command = export_command(engine, config_file)
    completed = process.run_streaming(command.argv, env=command.env, on_line=on_line,
                                      log_file=out_dir.with_name(out_dir.name + ".export.log"))
    if not completed.ok:
        raise process.CommandFailed(completed, "merging the adapter into the base model (llamafactory-cli export)")
    if not any(partial.glob("*.safetensors")):
        raise PublishError(f"llamafactory-cli export wrote no safetensors in {partial}")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def register_merged(
    tracker: RunTracker, merged_dir: Path, name: str, adapter_model: str, adapter_version: str, facts: AdapterFacts
) -> str:
    """The merged files as a logged model of the run and a version of `name`, aliased champion (only champions are
    merged), linked both ways with the adapter version. Returns `<name>/<version>`; registered once per adapter
    version."""
    client = tracker.client
    earlier = client.get_model_version(adapter_model, adapter_version).tags.get(MERGED_VERSION_TAG)
    if earlier:
        return earlier
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    link = {"adapter.model": adapter_model, "adapter.version": adapter_version}
    model = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=tracker.run_id,
                                       tags={**facts.tags(), **link}, model_type=MODEL_TYPE)
    try:
        client.log_model_artifacts(model.model_id, str(merged_dir))
    except (OSError, MlflowException) as err:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise PublishError(f"could not upload the merged model in {merged_dir} to MLflow ({err})") from err
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, step=0)])
    try:
        client.create_registered_model(name, description=MERGED_DESCRIPTION)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = str(client.create_model_version(
        name, source=client.get_logged_model(model.model_id).artifact_location, run_id=tracker.run_id,
        tags={**facts.tags(), **link}, model_id=model.model_id,
        description=f"{adapter_model} version {adapter_version} merged into {facts.base_model}.",
    ).version)
    note_version(tracker, model.model_id, name, version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(adapter_model, adapter_version, MERGED_VERSION_TAG, f"{name}/{version}")
    return f"{name}/{version}"


def merged_model_name(settings: MergedExportSettings, adapter_model: str) -> str:
    return settings.registered_model or f"{adapter_model}-merged"

"""`npu-sft evaluate`: find the run whose adapter to score again, and refuse, in one line, one that cannot be; for
a registered version, get what its training recorded back from MLflow, so any host with the store can score it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from npu_sft.datasets import EVAL_SPLIT_ARTIFACTS
from npu_sft.publishing import registry
from npu_sft.publishing.adapter_model import base_model_for
from npu_sft.publishing.errors import RegistryError
from npu_sft.settings import ConfigError, MlflowSettings, Pipeline
from npu_sft.tracking import client_for, tracking_uri
from npu_sft.training import evaluation_results
from npu_sft.training.completion import ADAPTER_WEIGHTS

RUN_CONFIG = "llamafactory.yaml"  # what the train task wrote into the run's directory
RUN_CONFIG_ARTIFACT_DIR = "config"
RESULTS = "all_results.json"  # the training's eval_loss, which the evaluation reports beside its scores
RESULTS_ARTIFACT_DIR = "results"
# What scoring a registered version needs from its run's record, beside the registry's files and the base model.
RECORD_ARTIFACTS = (
    f"{RUN_CONFIG_ARTIFACT_DIR}/{RUN_CONFIG}", f"{RESULTS_ARTIFACT_DIR}/{RESULTS}", *EVAL_SPLIT_ARTIFACTS
)
RECORDED_DIR = "recorded"  # in the run's directory on this host: what the record gave back


@dataclass(frozen=True)
class EvaluationTarget:
    """What `npu-sft evaluate` scores: a run's own output adapter, or a registered version's files (which are
    recorded into the run that produced the version)."""

    run_id: str
    version: str | None = None  # resolved number; None: the adapter in the run's output directory


def run_dir_of(pipeline: Pipeline, run_id: str) -> Path:
    return pipeline.state_dir / "runs" / run_id


def find_evaluation_target(pipeline: Pipeline, run_id: str | None, version: str | None) -> EvaluationTarget:
    """`--run RUN_ID`, checked to have its working directory (engine config with the held-out split, the training's
    results, the adapter) on this host; or `--version N|latest|champion` of `publish.registered_model`, checked to
    have its run's record in the store and to be an adapter of the config's model (its files come from the
    registry, so any host with the store can score it)."""
    settings = pipeline.settings
    if (run_id is None) == (version is None):
        raise ConfigError("npu-sft evaluate: give one of --run RUN_ID or --version N")
    target = EvaluationTarget(run_id) if run_id is not None else _version_target(pipeline, version or "")
    try:
        client_for(settings.mlflow).get_run(target.run_id)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ConfigError(f"--run {target.run_id}: no such MLflow run in {tracking_uri(settings.mlflow)}") from None
    if target.version is not None:
        _check_record(pipeline, target)
        return target
    run_dir = run_dir_of(pipeline, target.run_id)
    for path in (run_dir / RUN_CONFIG, run_dir / "output" / RESULTS, run_dir / "output" / ADAPTER_WEIGHTS):
        if not path.is_file():
            raise ConfigError(
                f"--run {target.run_id}: {path} is missing; evaluate runs where the training ran, with the same "
                "state_dir"
            )
    return target


def _version_target(pipeline: Pipeline, version: str) -> EvaluationTarget:
    settings = pipeline.settings
    name = settings.publish.registered_model
    try:
        resolved = registry.resolve_version(settings.mlflow, name, version)
        return EvaluationTarget(registry.run_of_version(settings.mlflow, name, resolved), resolved)
    except RegistryError as err:
        raise ConfigError(f"--version {version}: {err}") from None


def _check_record(pipeline: Pipeline, target: EvaluationTarget) -> None:
    settings = pipeline.settings
    name, version = settings.publish.registered_model, target.version or ""
    uri = f"models:/{name}/{version}"
    base_model_for(settings.model, registry.version_tags(settings.mlflow, name, version), uri)
    client = client_for(settings.mlflow)
    recorded = {
        info.path
        for folder in {artifact.rpartition("/")[0] for artifact in RECORD_ARTIFACTS}
        for info in client.list_artifacts(target.run_id, folder)
    }
    missing = [artifact for artifact in RECORD_ARTIFACTS if artifact not in recorded]
    if missing:
        raise ConfigError(
            f"--version {version}: run {target.run_id}, which trained {uri}, recorded no {', '.join(missing)} "
            "(it ran before npu-sft recorded them); evaluate it with --run where it trained"
        )


def restore_training_record(
    settings: MlflowSettings, run_id: str, dest: Path, model_path: Path
) -> tuple[Path, dict[str, float]]:
    """The training's engine config, final evaluation and eval split, from the run's record into `dest`; the config
    points at this host's copy of the base model and at the restored split. Returns the config file and the
    training's final evaluation (eval_loss, perplexity, ...)."""
    shutil.rmtree(dest, ignore_errors=True)  # an earlier restore of the same run: the record is the truth
    for artifact in RECORD_ARTIFACTS:
        folder = dest / artifact.rpartition("/")[0]  # a single file is downloaded into dst_path itself
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(folder), tracking_uri=tracking_uri(settings)
        )
    config_file = dest / RUN_CONFIG_ARTIFACT_DIR / RUN_CONFIG
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    # The training host's paths: its base model copy and its prepared data directory.
    config["model_name_or_path"] = str(model_path)
    config["dataset_dir"] = str(dest / EVAL_SPLIT_ARTIFACTS[0].rpartition("/")[0])
    config_file.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return config_file, evaluation_results(dest / RESULTS_ARTIFACT_DIR)

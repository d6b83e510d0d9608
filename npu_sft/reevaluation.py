"""`npu-sft evaluate`: find the run whose adapter to score again, and refuse, in one line, one that cannot be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from npu_sft import registry
from npu_sft.completion import ADAPTER_WEIGHTS
from npu_sft.settings import ConfigError, Pipeline
from npu_sft.tracking import client_for, tracking_uri

RUN_CONFIG = "llamafactory.yaml"  # what the train task wrote into the run's directory
RESULTS = "all_results.json"  # the training's eval_loss, which the evaluation reports beside its scores


@dataclass(frozen=True)
class EvaluationTarget:
    """What `npu-sft evaluate` scores: a run's own output adapter, or a registered version's files (which are
    recorded into the run that produced the version)."""

    run_id: str
    version: str | None = None  # resolved number; None: the adapter in the run's output directory


def run_dir_of(pipeline: Pipeline, run_id: str) -> Path:
    return pipeline.state_dir / "runs" / run_id


def find_evaluation_target(pipeline: Pipeline, run_id: str | None, version: str | None) -> EvaluationTarget:
    """`--run RUN_ID`, or `--version N|latest|champion` of `publish.registered_model` (its files come from the
    registry), checked to exist in the store and to have its run's working directory (engine config with the
    held-out split, the training's results) on this host."""
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
    run_dir = run_dir_of(pipeline, target.run_id)
    needed = [run_dir / RUN_CONFIG, run_dir / "output" / RESULTS]
    if target.version is None:
        needed.append(run_dir / "output" / ADAPTER_WEIGHTS)
    for path in needed:
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
    except registry.RegistryError as err:
        raise ConfigError(f"--version {version}: {err}") from None

"""`npu-sft evaluate`: find the run whose adapter to score again, and refuse, in one line, one that cannot be."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from npu_sft import registry
from npu_sft.completion import ADAPTER_WEIGHTS
from npu_sft.settings import ConfigError, Pipeline
from npu_sft.tracking import client_for, tracking_uri

RUN_CONFIG = "llamafactory.yaml"  # what the train task wrote into the run's directory


def run_dir_of(pipeline: Pipeline, run_id: str) -> Path:
    return pipeline.state_dir / "runs" / run_id


def find_run_to_evaluate(pipeline: Pipeline, run_id: str | None, version: str | None) -> str:
    """The MLflow run id of `--run RUN_ID` or `--version N` (of `publish.registered_model`), checked to exist in the
    store and to have its working directory (adapter and engine config) on this host."""
    settings = pipeline.settings
    if (run_id is None) == (version is None):
        raise ConfigError("npu-sft evaluate: give one of --run RUN_ID or --version N")
    if version is not None:
        try:
            run_id = registry.run_of_version(settings.mlflow, settings.publish.registered_model, version)
        except registry.RegistryError as err:
            raise ConfigError(f"--version {version}: {err}") from None
    if run_id is None:  # narrowed above; kept for the type checker
        raise ConfigError("npu-sft evaluate: no run")
    try:
        client_for(settings.mlflow).get_run(run_id)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ConfigError(f"--run {run_id}: no such MLflow run in {tracking_uri(settings.mlflow)}") from None
    run_dir = run_dir_of(pipeline, run_id)
    for needed in (run_dir / RUN_CONFIG, run_dir / "output" / ADAPTER_WEIGHTS):
        if not needed.is_file():
            raise ConfigError(
                f"--run {run_id}: {needed} is missing; evaluate runs where the training ran, with the same state_dir"
            )
    return run_id

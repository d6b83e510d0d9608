"""MLflow: one run per pipeline run, written by this process only (SQLite allows one writer at a time)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from npu_sft.settings import MlflowSettings

MLFLOW_BATCH_LIMIT = 100


def tracking_uri(settings: MlflowSettings) -> str:
    """Relative SQLite paths become absolute, so every process (worker, CLI, UI) opens the same store."""
    prefix = "sqlite:///"
    uri = settings.tracking_uri
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        db = Path(uri[len(prefix) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    return uri


def artifact_location(settings: MlflowSettings) -> str | None:
    if "://" in settings.artifact_location:
        return settings.artifact_location
    path = Path(settings.artifact_location).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def client_for(settings: MlflowSettings) -> MlflowClient:
    uri = tracking_uri(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(settings: MlflowSettings, run_name: str, tags: Mapping[str, str]) -> str:
    client = client_for(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(settings.experiment, artifact_location=artifact_location(settings))
        except MlflowException as err:
            # Another pipeline run created it between our lookup and create.
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment_id = client.get_experiment_by_name(settings.experiment).experiment_id
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


def log_params(settings: MlflowSettings, run_id: str, params: Mapping[str, str]) -> None:
    client = client_for(settings)
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), MLFLOW_BATCH_LIMIT):
        client.log_batch(run_id, params=items[start : start + MLFLOW_BATCH_LIMIT])


def log_metrics(settings: MlflowSettings, run_id: str, metrics: Iterable[tuple[str, float, int]]) -> None:
    """(key, value, step) triples; non-finite values are skipped because MLflow's UI cannot plot them."""
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, step) for key, value, step in metrics if math.isfinite(float(value))]
    client = client_for(settings)
    for start in range(0, len(items), MLFLOW_BATCH_LIMIT):
        client.log_batch(run_id, metrics=items[start : start + MLFLOW_BATCH_LIMIT])


def set_tags(settings: MlflowSettings, run_id: str, tags: Mapping[str, str]) -> None:
    client = client_for(settings)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_artifact(settings: MlflowSettings, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client = client_for(settings)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def finish_run(settings: MlflowSettings, run_id: str, succeeded: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if succeeded else RunStatus.FAILED)
    client_for(settings).set_terminated(run_id, status=status)


def register_artifact(settings: MlflowSettings, run_id: str, artifact_path: str, model_name: str) -> str:
    """A new version of `model_name` whose files are the run's `artifact_path`. Returns the version number."""
    client = client_for(settings)
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    run = client.get_run(run_id)
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id
    )
    return str(version.version)

"""The tracking store: its URI as every process must see it, one client per store, the pipeline's experiment."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from npu_sft.service_env import MLFLOW_SERVER_STORE_VAR, MLFLOW_SERVER_VAR
from npu_sft.settings import MlflowSettings
from npu_sft.tracking.tags import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

_SQLITE = "sqlite:///"


def tracking_uri(settings: MlflowSettings, environ: Mapping[str, str] = os.environ) -> str:
    """Relative SQLite paths become absolute, so every process (worker, CLI, UI) opens the same store; the store
    `make up`'s MLflow server serves is reached through that server."""
    uri = settings.tracking_uri
    if uri.startswith(_SQLITE) and not uri[len(_SQLITE) :].startswith("/"):
        db = Path(uri[len(_SQLITE) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = _SQLITE + str(db)
    server, served_store = environ.get(MLFLOW_SERVER_VAR), environ.get(MLFLOW_SERVER_STORE_VAR)
    if server and served_store and _same_store(uri, served_store):
        return server
    return uri


def _same_store(uri: str, other: str) -> bool:
    if uri.startswith(_SQLITE) and other.startswith(_SQLITE):
        return Path(uri[len(_SQLITE) :]).resolve() == Path(other[len(_SQLITE) :]).resolve()
    return uri == other


def artifact_location(settings: MlflowSettings) -> str | None:
    if "://" in settings.artifact_location:
        return settings.artifact_location
    path = Path(settings.artifact_location).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def client_for(settings: MlflowSettings) -> MlflowClient:
    """One client per tracking store for the whole process (the registry lives in the same store)."""
    return _client(tracking_uri(settings))


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, settings: MlflowSettings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        kind = experiment.tags.get(EXPERIMENT_KIND_TAG, "")
        # A kind the UI guessed (or none) is replaced; one a user chose in the UI is theirs.
        if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            settings.experiment,
            artifact_location=artifact_location(settings),
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    except MlflowException as err:
        # Another pipeline run created it between our lookup and create.
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(settings.experiment).experiment_id

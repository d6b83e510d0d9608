"""MLflow: one run per pipeline run, written by this process only (SQLite allows one writer at a time)."""

from __future__ import annotations

import functools
import json
import os
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from npu_sft import recording
from npu_sft.service_env import MLFLOW_SERVER_STORE_VAR, MLFLOW_SERVER_VAR
from npu_sft.settings import MlflowSettings

MLFLOW_BATCH_LIMIT = 100
FLOW_RUN_TAG = "prefect_flow_run_id"  # which Prefect flow run an MLflow run belongs to
END_REASON_TAG = "npu_sft.end_reason"  # why a run did not finish: the flow run's final state and its message
# MLflow's UI opens an experiment by its kind: without one, MLflow 3 may open it as a GenAI experiment (an empty
# traces page) instead of the runs table and charts. "custom_model_development" is its "Machine learning" kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


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


def _experiment_id(client: MlflowClient, settings: MlflowSettings) -> str:
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


@dataclass(frozen=True)
class RunTracker:
    """The pipeline run's MLflow run, and everything the stages record in it (a `RunRecorder`).

    Plain data (settings and run id), so tasks can take it as a parameter and Prefect can hash it; the client comes
    from the process-wide one for the store.

        tracker = RunTracker.start(settings.mlflow, run_name="tiny-cpu-crazy-capybara", tags={...})
        tracker.log_metrics([("eval_loss", 2.81, 0)])
        tracker.finish(succeeded=True)
    """

    settings: MlflowSettings
    run_id: str

    @classmethod
    def start(cls, settings: MlflowSettings, run_name: str, tags: Mapping[str, str]) -> RunTracker:
        client = client_for(settings)
        run = client.create_run(_experiment_id(client, settings), run_name=run_name, tags=dict(tags))
        return cls(settings, run.info.run_id)

    @property
    def client(self) -> MlflowClient:
        return client_for(self.settings)

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), MLFLOW_BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_BATCH_LIMIT])

    def log_metrics(self, metrics: Iterable[tuple[str, float, int]]) -> None:
        """(key, value, step) triples; non-finite values are skipped because MLflow's UI cannot plot them."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value, step in metrics if math.isfinite(float(value))]
        for start in range(0, len(items), MLFLOW_BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=items[start : start + MLFLOW_BATCH_LIMIT])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, len(items), MLFLOW_BATCH_LIMIT):
            self.client.log_batch(self.run_id, tags=items[start : start + MLFLOW_BATCH_LIMIT])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(document), artifact_file)

    def log_table(self, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, dict(columns), artifact_file)

    def log_dataset_inputs(self, datasets: Iterable[recording.DatasetInput]) -> None:
        """As MLflow's dataset inputs (source type "local", as `mlflow.data` records a local file), so the runs
        table's Dataset column and the run's dataset view show name, digest, rows, schema and context."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=dataset.name,
                    digest=dataset.digest,
                    source_type="local",
                    source=json.dumps({"uri": dataset.path.resolve().as_uri()}),
                    schema=json.dumps({"mlflow_colspec": dataset.schema}),
                    profile=json.dumps({"num_rows": dataset.rows}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, dataset.context)],
            )
            for dataset in datasets
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def logged_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """The newest step of each of `keys` the run already holds (from an earlier run of the same task)."""
        logged: dict[str, int] = {}
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                logged[key] = max(metric.step for metric in history)
        return logged

    def finish(self, succeeded: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if succeeded else RunStatus.FAILED)
        self.client.set_terminated(self.run_id, status=status)


def end_running_runs(
    client: MlflowClient, experiment_ids: list[str], flow_run_id: str, status: str, reason: str | None, reason_tag: str
) -> list[str]:
    """End the flow run's MLflow runs in `experiment_ids` that are still RUNNING with `status` (FINISHED, FAILED or
    KILLED), `reason` in `reason_tag`; returns their ids. A run some earlier hand already ended is left as it is."""
    if not experiment_ids:
        return []
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.{FLOW_RUN_TAG} = '{flow_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        if reason:
            client.set_tag(run.info.run_id, reason_tag, reason[:5000])
        client.set_terminated(run.info.run_id, status=status)
    return [run.info.run_id for run in runs]


def end_runs_of_flow_run(settings: MlflowSettings, flow_run_id: str, status: str, reason: str | None) -> list[str]:
    """`end_running_runs` in the pipeline's experiment, the reason in `npu_sft.end_reason`."""
    client = client_for(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_ids = [experiment.experiment_id] if experiment is not None else []
    return end_running_runs(client, experiment_ids, flow_run_id, status, reason, END_REASON_TAG)


class StepMetricSink:
    """`on_metrics` for the training follower: step metrics MLflow refuses for a while (a SQLite store another process
    holds locked, a tracking server restarting) are kept and sent, in order, with the next batch, so the curve keeps
    every step once and the follower goes on. The log says once that metrics are delayed and once that they caught up.

        sink = StepMetricSink(run.tracker, on_warning=logger.warning)
        run_training(..., on_metrics=sink)
        sink.flush()   # the last try; what is still refused then is reported, not raised: the training is done
    """

    def __init__(self, tracker: RunTracker, on_warning: Callable[[str], None]):
        self._tracker = tracker
        self._warn = on_warning
        self._pending: list[tuple[str, float, int]] = []
        self._refused_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __call__(self, metrics: Iterable[tuple[str, float, int]]) -> None:
        self._pending.extend(metrics)
        self._send()

    def _send(self) -> bool:
        while self._pending:
            batch = self._pending[:MLFLOW_BATCH_LIMIT]
            try:
                self._tracker.log_metrics(batch)
            except MlflowException as err:
                if self._refused_since is None:
                    self._refused_since = time.monotonic()
                    self._warn(f"MLflow refused step metrics ({err.message.splitlines()[0][:200]}); keeping them and "
                               "retrying with the next steps")
                return False
            # Dropped only once MLflow has them: a retry never logs a step twice.
            del self._pending[: len(batch)]
        if self._refused_since is not None:
            self._warn(f"MLflow accepts step metrics again after {time.monotonic() - self._refused_since:.0f} s; "
                       "the delayed steps are logged")
            self._refused_since = None
        return True

    def flush(self, attempts: int = 5, wait_s: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        for attempt in range(attempts):
            if self._send():
                return
            if attempt < attempts - 1:
                sleep(wait_s)
        self._warn(f"{len(self._pending)} step metrics could not be logged to MLflow; they are in the run's trainer log")

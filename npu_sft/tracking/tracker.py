"""MLflow: one run per pipeline run, written by this process only (SQLite allows one writer at a time)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from npu_sft import run_recorder
from npu_sft.settings import MlflowSettings
from npu_sft.tracking.client import client_for, experiment_id

MLFLOW_BATCH_LIMIT = 100


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
        run = client.create_run(experiment_id(client, settings), run_name=run_name, tags=dict(tags))
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

    def log_dataset_inputs(self, datasets: Iterable[run_recorder.DatasetInput]) -> None:
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

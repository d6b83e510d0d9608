"""The run tracker against a real MLflow store (SQLite), and the step-metric sink surviving refused writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from npu_sft.settings import MlflowSettings
from npu_sft.tracking import RunTracker, StepMetricSink


@pytest.fixture
def tracker(tmp_path: Path) -> RunTracker:
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"), experiment="t"
    )
    return RunTracker.start(settings, run_name="r", tags={"pipeline": "t"})


class LockedStore:
    """Makes the tracker's client refuse `refusals` log_batch calls the way MLflow's SQL store reports a locked
    SQLite database (it wraps sqlalchemy's OperationalError)."""

    def __init__(self, tracker: RunTracker, monkeypatch: pytest.MonkeyPatch, refusals: int):
        self.refusals = refusals
        real = tracker.client.log_batch

        def log_batch(*args, **kwargs):
            if self.refusals > 0:
                self.refusals -= 1
                raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
            return real(*args, **kwargs)

        monkeypatch.setattr(tracker.client, "log_batch", log_batch)


def loss_steps(tracker: RunTracker) -> list[int]:
    return sorted(metric.step for metric in tracker.client.get_metric_history(tracker.run_id, "loss"))


def test_the_tracker_records_what_the_stages_need(tracker: RunTracker, tmp_path: Path) -> None:
    tracker.log_params({"lora_rank": "16"})
    tracker.log_metrics([("loss", 2.0, 2), ("loss", 1.5, 4), ("eval_loss", float("nan"), 4)])
    tracker.set_tags({"data.key": "abc"})
    (tmp_path / "a.txt").write_text("x")
    tracker.log_artifact(tmp_path / "a.txt", "logs")
    tracker.log_dict({"files": []}, "model_manifest.json")
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params["lora_rank"] == "16" and run.data.tags["data.key"] == "abc"
    assert "eval_loss" not in run.data.metrics  # NaN is left out: MLflow's charts cannot draw it
    assert tracker.logged_steps(["loss", "eval_loss"]) == {"loss": 4}
    assert {a.path for a in tracker.client.list_artifacts(tracker.run_id)} == {"logs", "model_manifest.json"}
    tracker.finish(succeeded=False)
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"


def test_refused_step_metrics_are_kept_and_sent_once_the_store_accepts_them(
    tracker: RunTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    sink = StepMetricSink(tracker, on_warning=warnings.append)
    store = LockedStore(tracker, monkeypatch, refusals=2)
    sink([("loss", 3.0, 2)])  # refused
    sink([("loss", 2.5, 4)])  # refused again: both kept
    assert sink.pending == 2 and loss_steps(tracker) == []
    sink([("loss", 2.0, 6)])  # accepted: the delayed steps first, each once
    assert store.refusals == 0 and sink.pending == 0
    assert loss_steps(tracker) == [2, 4, 6]
    assert len(warnings) == 2
    assert "MLflow refused step metrics ((sqlite3.OperationalError) database is locked)" in warnings[0]
    assert "accepts step metrics again" in warnings[1]


def test_flush_retries_then_reports_what_it_could_not_log(tracker: RunTracker, monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    sink = StepMetricSink(tracker, on_warning=warnings.append)
    LockedStore(tracker, monkeypatch, refusals=100)
    sink([("loss", 3.0, 2), ("loss", 2.5, 4)])
    sleeps: list[float] = []
    sink.flush(attempts=3, wait_s=1.5, sleep=sleeps.append)  # never raises: the training itself is done
    assert sleeps == [1.5, 1.5]
    assert warnings[-1].startswith("2 step metrics could not be logged to MLflow")


def test_the_training_follower_goes_on_after_a_refused_write(
    tracker: RunTracker, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    import yaml

    from npu_sft.engine import DistributedLaunch, EngineSettings
    from npu_sft.training import RetryPolicy, run_training
    from tests.unit.training.test_attempts import ScriptedEngine
    from tests.unit.training.test_failures import RANK_KILLED

    output_dir = tmp_path / "output"
    config_file = tmp_path / "llamafactory.yaml"
    config_file.write_text(yaml.safe_dump({"output_dir": str(output_dir)}))
    engine = ScriptedEngine(output_dir, [
        {"returncode": 1, "tail": RANK_KILLED, "steps": [2, 4, 6, 8, 10, 12], "checkpoints": [10]},
        {"returncode": 0, "steps": [12, 14, 16]},
    ])
    warnings: list[str] = []
    sink = StepMetricSink(tracker, on_warning=warnings.append)
    LockedStore(tracker, monkeypatch, refusals=1)  # the first attempt's steps meet a locked store
    run_training(
        EngineSettings(python=sys.executable), DistributedLaunch(nproc_per_node=2, master_port=29555), config_file,
        output_dir, device_env={}, log_file=tmp_path / "train.log", on_line=lambda line: None, on_metrics=sink,
        run_command=engine, policy=RetryPolicy(retry_delay_s=0), poll_interval_s=0.01,
    )
    sink.flush(sleep=lambda s: None)
    assert loss_steps(tracker) == [2, 4, 6, 8, 10, 12, 14, 16]  # each step once, none lost
    assert len(warnings) == 2  # said once when it began, once when it ended
    assert warnings[0].startswith("MLflow refused step metrics") and "accepts step metrics again" in warnings[1]


def test_experiments_open_as_model_training(tmp_path: Path) -> None:
    from npu_sft.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "artifacts"), experiment="k"
    )
    tracker = RunTracker.start(settings, run_name="r", tags={})
    client = tracker.client
    experiment = client.get_experiment_by_name("k")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    # A kind the UI inferred is replaced; one a user chose is kept.
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "genai_development_inferred")
    RunTracker.start(settings, run_name="r2", tags={})
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "finetuning")
    RunTracker.start(settings, run_name="r3", tags={})
    assert client.get_experiment(experiment.experiment_id).tags[EXPERIMENT_KIND_TAG] == "finetuning"

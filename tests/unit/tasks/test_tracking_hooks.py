"""The MLflow run's lifecycle in the flow's state hooks: FINISHED, FAILED with the reason, KILLED when cancelled, and
the flow's own error never hidden by a hook's."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from mlflow.exceptions import MlflowException
from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelling
from prefect.testing.utilities import prefect_test_harness

import tasks.tracking
from npu_sft.settings import load_pipeline
from npu_sft.tracking import END_REASON_TAG, FLOW_RUN_TAG, RunTracker, client_for
from tasks.tracking import TRACKING_HOOKS, end_tracking_killed

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def overrides(tmp_path: Path) -> list[str]:
    return [
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
        f"engine.python={sys.executable}",
    ]


def started_run(overrides: list[str], flow_run_id: str) -> RunTracker:
    settings = load_pipeline(DEMO_CONFIG, overrides).settings.mlflow
    return RunTracker.start(settings, run_name="r", tags={FLOW_RUN_TAG: flow_run_id})


def run_info(tracker: RunTracker):
    return client_for(tracker.settings).get_run(tracker.run_id)


@flow(**TRACKING_HOOKS)
def tracked(config: str, overrides: list[str], fail: bool) -> str:
    """What the sft flow does with its MLflow run: start it in the body, leave its end to the hooks."""
    tracker = started_run(overrides, current_flow_run.get_id())
    if fail:
        raise ValueError("lora_target 'q_projj' not found in the model")
    return tracker.run_id


def test_a_completed_flow_run_finishes_its_mlflow_run(prefect_server: None, overrides: list[str]) -> None:
    run_id = tracked(str(DEMO_CONFIG), overrides, fail=False)
    settings = load_pipeline(DEMO_CONFIG, overrides).settings.mlflow
    assert client_for(settings).get_run(run_id).info.status == "FINISHED"


def test_a_failed_flow_run_fails_its_mlflow_run_with_the_reason(prefect_server: None, overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="q_projj"):
        tracked(str(DEMO_CONFIG), overrides, fail=True)
    settings = load_pipeline(DEMO_CONFIG, overrides).settings.mlflow
    (run,) = client_for(settings).search_runs([client_for(settings).get_experiment_by_name("sft-tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[END_REASON_TAG].startswith("Failed: ") and "q_projj" in run.data.tags[END_REASON_TAG]


def test_a_hook_that_fails_does_not_hide_the_flows_error(
    prefect_server: None, overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def store_locked(*args: object, **kwargs: object) -> list[str]:
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(tasks.tracking, "end_runs_of_flow_run", store_locked)
    with pytest.raises(ValueError, match="q_projj"):  # the flow's error, not the hook's
        tracked(str(DEMO_CONFIG), overrides, fail=True)


def test_a_cancelled_flow_run_kills_its_mlflow_run(overrides: list[str]) -> None:
    flow_run = FlowRun(id=uuid4(), flow_id=uuid4(), parameters={"config": str(DEMO_CONFIG), "overrides": overrides})
    tracker = started_run(overrides, str(flow_run.id))
    other = started_run(overrides, str(uuid4()))  # another flow run's: left alone
    end_tracking_killed(None, flow_run, Cancelling(message="cancelled from the UI"))
    assert run_info(tracker).info.status == "KILLED"
    assert run_info(tracker).data.tags[END_REASON_TAG] == "Cancelling: cancelled from the UI"
    assert run_info(other).info.status == "RUNNING"


def test_a_flow_run_whose_config_does_not_load_ends_nothing(overrides: list[str]) -> None:
    flow_run = FlowRun(id=uuid4(), flow_id=uuid4(), parameters={"config": "missing.yaml"})
    end_tracking_killed(None, flow_run, Cancelling())  # no MLflow run was ever started; nothing to raise

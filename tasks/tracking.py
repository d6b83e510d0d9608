"""The pipeline run's MLflow run: opened by a task, ended by the flow's state hooks.

The hooks end it from the flow run's final state, whatever ended the flow: completed -> FINISHED; failed or crashed
(Ctrl+C, a lost worker) -> FAILED; cancelled -> KILLED; the state's message goes into the run's `npu_sft.end_reason`
tag. Prefect logs a hook's own error and never lets it replace the flow's. A flow process killed outright runs no
hook: the reconciler (`make up`) ends those runs.

    @flow(name="sft", **TRACKING_HOOKS)
"""

from __future__ import annotations

from typing import Any

from mlflow.entities import RunStatus
from prefect import get_run_logger, task
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging import get_logger
from prefect.runtime import flow_run

from npu_sft.llamafactory_config import loggable_params
from npu_sft.reevaluation import run_dir_of
from npu_sft.runs import RunContext
from npu_sft.settings import ConfigError, Pipeline, load_pipeline
from npu_sft.tracking import FLOW_RUN_TAG, RunTracker, end_runs_of_flow_run


@task
def start_tracking(pipeline: Pipeline) -> RunContext:
    """Open the pipeline run's single MLflow run; its id names the run's working directory."""
    settings = pipeline.settings
    flow_run_id = flow_run.get_id()
    tags = {"pipeline": settings.name, "pipeline_config": str(pipeline.config_file)}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    tracker = RunTracker.start(settings.mlflow, run_name=f"{settings.name}-{flow_run.get_name() or 'local'}", tags=tags)
    run_dir = run_dir_of(pipeline, tracker.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker.log_params(loggable_params(pipeline.llamafactory))
    get_run_logger().info("MLflow run %s, working directory %s", tracker.run_id, run_dir)
    return RunContext(tracker, run_dir, flow_run_id)


@task
def attach_tracking(pipeline: Pipeline, run_id: str) -> RunContext:
    """An earlier pipeline run's MLflow run and working directory, to record into again (`npu-sft evaluate`); its
    status stays as the pipeline run left it."""
    tracker = RunTracker(pipeline.settings.mlflow, run_id)
    flow_run_id = flow_run.get_id()
    if flow_run_id:
        tracker.set_tags({"eval/flow_run_id": flow_run_id})
    return RunContext(tracker, run_dir_of(pipeline, run_id), flow_run_id)


def _end_tracking(flow_run: FlowRun, status: int, reason: str | None) -> None:
    parameters = flow_run.parameters
    try:
        pipeline = load_pipeline(parameters["config"], parameters.get("overrides"))
    except ConfigError:  # the flow stopped at its config: no MLflow run was started
        return
    status_name = RunStatus.to_string(status)
    for run_id in end_runs_of_flow_run(pipeline.settings.mlflow, str(flow_run.id), status_name, reason):
        get_logger("npu_sft.tracking").info("MLflow run %s ended %s", run_id, status_name)


def _reason(state: State) -> str:
    return f"{state.name}: {state.message}" if state.message else state.name


def end_tracking_finished(flow: Any, flow_run: FlowRun, state: State) -> None:
    _end_tracking(flow_run, RunStatus.FINISHED, None)


def end_tracking_failed(flow: Any, flow_run: FlowRun, state: State) -> None:
    _end_tracking(flow_run, RunStatus.FAILED, _reason(state))


def end_tracking_killed(flow: Any, flow_run: FlowRun, state: State) -> None:
    _end_tracking(flow_run, RunStatus.KILLED, _reason(state))


TRACKING_HOOKS: dict[str, Any] = {
    "on_completion": [end_tracking_finished],
    "on_failure": [end_tracking_failed],
    "on_crashed": [end_tracking_failed],
    "on_cancellation": [end_tracking_killed],
}

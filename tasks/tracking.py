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
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging import get_logger
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_UI_URL

from npu_sft.engine.llamafactory_config import loggable_params
from npu_sft.evaluation.reevaluation import run_dir_of
from npu_sft.publishing.versions import Published
from npu_sft.settings import ConfigError, Pipeline, load_pipeline
from npu_sft.tracking import FLOW_RUN_TAG, RunContext, RunTracker, end_runs_of_flow_run, tracking_uri
from npu_sft.tracking.description import RunOrigin, pipeline_params, source_tags
from npu_sft.tracking.summary import (
    MLFLOW_LINK_ARTIFACT_KEY,
    SUMMARY_ARTIFACT_KEY,
    RunSummary,
    mlflow_run_url,
    mlflow_ui_url,
)


@task
def start_tracking(pipeline: Pipeline) -> RunContext:
    """Open the pipeline run's single MLflow run; its id names the run's working directory. Its params are the
    LLaMA-Factory keys and the `pipeline.*` settings; its tags say where it came from."""
    settings = pipeline.settings
    flow_run_id = flow_run.get_id()
    tags = {"pipeline": settings.name, "pipeline_config": str(pipeline.config_file)}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = flow_run_id
    deployment_name = f"{flow_run.flow_name}/{deployment.name}" if deployment.get_id() else None
    tags.update(source_tags(RunOrigin.here(deployment=deployment_name, flow_run_url=_flow_run_url())))
    tracker = RunTracker.start(settings.mlflow, run_name=f"{settings.name}-{flow_run.get_name() or 'local'}", tags=tags)
    run_dir = run_dir_of(pipeline, tracker.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker.log_params({**loggable_params(pipeline.llamafactory), **pipeline_params(pipeline)})
    get_run_logger().info("MLflow run %s, working directory %s", tracker.run_id, run_dir)
    url = _mlflow_run_url(tracker)
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {tracker.run_id}", key=MLFLOW_LINK_ARTIFACT_KEY,
                             description="This flow run's MLflow run: params, curves, datasets, artifacts")
    return RunContext(tracker, run_dir, flow_run_id)


def _mlflow_run_url(tracker: RunTracker) -> str | None:
    ui_url = mlflow_ui_url(tracking_uri(tracker.settings))
    if ui_url is None:
        return None
    return mlflow_run_url(ui_url, tracker.client.get_run(tracker.run_id).info.experiment_id, tracker.run_id)


@task
def summarize_run(
    pipeline: Pipeline, run: RunContext, metrics: dict[str, float], published: Published | None,
    served_reply: str | None,
) -> str:
    """The flow run's summary on Prefect's Artifacts tab: scores against the base model, training figures, the
    registered version and its alias, and the link to the MLflow run."""
    summary = RunSummary(
        pipeline=pipeline.settings.name,
        mlflow_run_id=run.mlflow_run_id,
        mlflow_run_url=_mlflow_run_url(run.tracker),
        metrics=metrics,
        published=published,
        served_reply=served_reply,
        open_hint=f"mlflow ui --backend-store-uri {tracking_uri(pipeline.settings.mlflow)}",
    )
    markdown = summary.markdown()
    create_markdown_artifact(markdown, key=SUMMARY_ARTIFACT_KEY, description=f"{pipeline.settings.name}: summary")
    return markdown


def _flow_run_url() -> str | None:
    """The flow run's page in Prefect's UI, when there is a UI (a server, not a temporary local one)."""
    return flow_run.get_flow_run_ui_url() if PREFECT_UI_URL.value() else None


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

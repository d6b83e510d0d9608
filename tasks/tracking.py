from __future__ import annotations

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from npu_sft.llamafactory_config import loggable_params
from npu_sft.runs import RunContext
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunTracker


@task
def start_tracking(pipeline: Pipeline) -> RunContext:
    """Open the pipeline run's single MLflow run; its id names the run's working directory."""
    settings = pipeline.settings
    flow_run_id = flow_run.get_id()
    tags = {"pipeline": settings.name, "pipeline_config": str(pipeline.config_file)}
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    tracker = RunTracker.start(settings.mlflow, run_name=f"{settings.name}-{flow_run.get_name() or 'local'}", tags=tags)
    run_dir = pipeline.state_dir / "runs" / tracker.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker.log_params(loggable_params(pipeline.llamafactory))
    get_run_logger().info("MLflow run %s, working directory %s", tracker.run_id, run_dir)
    return RunContext(tracker, run_dir, flow_run_id)


@task
def finish_tracking(run: RunContext, succeeded: bool) -> None:
    run.tracker.finish(succeeded)

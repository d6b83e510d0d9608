from __future__ import annotations

from prefect import get_run_logger, task

from npu_sft.runs import RunContext
from npu_sft.settings import Pipeline
from npu_sft.training import collect_adapter
from tasks.train import Trained

ADAPTER_ARTIFACT = "adapter"


@task
def publish(pipeline: Pipeline, run: RunContext, trained: Trained) -> str | None:
    """Log the adapter to the run and register it as a new version in the MLflow Model Registry."""
    settings = pipeline.settings.publish
    adapter_dir = collect_adapter(trained.output_dir, run.run_dir / ADAPTER_ARTIFACT)
    run.tracker.log_artifact(adapter_dir, ADAPTER_ARTIFACT)
    if not settings.enabled:
        return None
    version = run.tracker.register_artifact(ADAPTER_ARTIFACT, settings.registered_model)
    get_run_logger().info("registered %s version %s", settings.registered_model, version)
    return version

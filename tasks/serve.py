from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from npu_sft.engine import served_name
from npu_sft.publishing.versions import Published
from npu_sft.serving import served_model, smoke_test_on_lease
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext
from tasks.train import Trained


@task
def serve_smoke_test(
    pipeline: Pipeline, run: RunContext, model_path: Path, trained: Trained, published: Published | None
) -> str:
    """Serve the adapter through LLaMA-Factory's OpenAI API on loopback, listed as the version it was registered as
    (or as the run when publishing is off), ask one question, stop the server."""
    logger = get_run_logger()
    settings = pipeline.settings
    if published is not None:
        name = served_name(published.name, published.version)
    else:
        name = f"{settings.name}:run-{run.mlflow_run_id[:8]}"
    model = served_model(pipeline, name, model_path, trained.output_dir)
    result = smoke_test_on_lease(
        pipeline, model, flow_run_id=run.flow_run_id, log_file=run.logs_dir / "serve.log", on_wait=logger.info
    )
    run.tracker.log_metrics([("serve_startup_s", result.startup_s, 0), ("serve_latency_s", result.latency_s, 0)])
    run.tracker.set_tags({"serve.reply": result.reply[:5000], "serve.model": result.model})
    logger.info("%s replied: %r", result.model, result.reply)
    return result.reply

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from npu_sft.download import log_manifest
from npu_sft.engine.tiny_model import ensure_tiny_model
from npu_sft.publishing.adapter_model import base_model_for
from npu_sft.publishing.registry import RegisteredAdapter
from npu_sft.settings import Pipeline, TinyModelSource
from npu_sft.tracking import RunContext
from tasks.download import download_model_task


@task
def make_tiny_model(pipeline: Pipeline, source: TinyModelSource) -> Path:
    """The embedded default's local source: generated once in the engine env, then reused."""
    logger = get_run_logger()
    model_dir = ensure_tiny_model(pipeline.settings.engine, pipeline.state_dir / "models", source.seed, on_line=logger.info)
    logger.info("tiny model at %s", model_dir)
    return model_dir


@task
def fetch_model(pipeline: Pipeline, run: RunContext) -> Path:
    """download: the tiny model from its local source, or the configured model through the download task; what
    was fetched (id, commit, files) goes into the run."""
    source = pipeline.settings.model
    if isinstance(source, TinyModelSource):
        model_dir = make_tiny_model(pipeline, source)
        run.tracker.set_tags({"model.source": "tiny", "model.path": str(model_dir)})
        return model_dir
    downloaded = download_model_task(source)
    log_manifest(run.tracker, downloaded)
    return downloaded.path


@task
def fetch_base_model(pipeline: Pipeline, adapter: RegisteredAdapter) -> Path:
    """A registered adapter's base model: the config's model, refused when the version was trained on another one,
    at the commit the version was trained on; generated, or downloaded (cached by its task)."""
    source = base_model_for(pipeline.settings.model, adapter.tags, adapter.uri)
    if isinstance(source, TinyModelSource):
        return make_tiny_model(pipeline, source)
    get_run_logger().info("base model of %s: %s at %s", adapter.uri, source.id or source.path, source.revision)
    return download_model_task(source).path

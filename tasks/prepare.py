"""Prefect tasks: the ModelScope dataset repositories, the prepared datasets (cached while their directory exists),
and their statistics in the run (MLflow and a Prefect table artifact)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.results import get_result_store

from npu_sft.datasets import (
    DatasetError,
    DataSettings,
    PreparedData,
    log_dataset_stats,
    prepare_datasets,
    prepared_dir_for,
    stats_table_rows,
)
from npu_sft.download import log_manifest
from npu_sft.download.datasets import with_downloaded_datasets
from npu_sft.engine.tiny_model import tokenizer_file
from npu_sft.settings import Pipeline
from npu_sft.tracking import RunContext

STATS_ARTIFACT_KEY = "dataset-stats"


@task(name="download-datasets", cache_policy=NO_CACHE)
def download_datasets(pipeline: Pipeline, run: RunContext) -> DataSettings:
    """ModelScope dataset repositories, through the same pinned, cached, verified path as models; each one's
    manifest goes into the run, so it says exactly which data it trained on."""
    resolved, downloads = with_downloaded_datasets(pipeline.data_settings(), pipeline.hub_source)
    for name, downloaded in downloads:
        get_run_logger().info("dataset %s: %s @ %s in %s", name, downloaded.model_id, downloaded.resolved_revision, downloaded.path)
        log_manifest(run.tracker, downloaded, prefix=f"dataset.{name}")
    return resolved


def prepared_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The prepared directory's own content key (inputs' bytes, settings, tokenizer, code) and path: an edited data
    file makes a new key, and a deleted directory is never answered from Prefect's cache."""
    try:
        pipeline: Pipeline = parameters["pipeline"]
        directory = prepared_dir_for(
            parameters["sources"], **pipeline.prepare_arguments(tokenizer_file(parameters["model_path"]))
        )
    except DatasetError:
        return None  # the task itself reports it
    # The whole path: Prefect's result store is shared by every project of the user on this host.
    key = f"prepared-datasets-{directory.name}-{hashlib.sha256(str(directory).encode()).hexdigest()[:16]}"
    if not directory.is_dir() and get_result_store().exists(key):
        # A cached answer naming a directory that was deleted since: prepare again, at the same path (the content
        # key's), which makes that answer true again.
        return None
    return key


@task(name="prepare-datasets", cache_key_fn=prepared_cache_key, persist_result=True)
def prepare_data(pipeline: Pipeline, run: RunContext, sources: DataSettings, model_path: Path) -> PreparedData:
    """Validate, dedup, split and measure the data before any device is taken; fails on too many rejects."""
    logger = get_run_logger()
    prepared = prepare_datasets(sources, **pipeline.prepare_arguments(tokenizer_file(model_path)))
    logger.info(
        "datasets %s: %s (%d train, %d eval rows, %d rejected)",
        "reused (cache hit)" if prepared.cache_hit else "prepared",
        prepared.dir,
        prepared.stats.train,
        prepared.stats.eval,
        prepared.stats.rejected,
    )
    for warning in prepared.stats.warnings:
        logger.warning(warning)
    return prepared


@task(name="record-datasets")
def record_datasets(pipeline: Pipeline, run: RunContext, data: PreparedData) -> None:
    """The statistics, rejects and registration in the run, and a table artifact in the flow run (every run, also
    when the preparation itself came from the cache)."""
    create_table_artifact(table=stats_table_rows(data.stats), key=STATS_ARTIFACT_KEY, description=_artifact_description(data))
    log_dataset_stats(run.tracker, data)


def _artifact_description(prepared: PreparedData) -> str:
    stats = prepared.stats
    lines = [
        f"Prepared datasets in `{prepared.dir}`" + (" (cache hit)" if prepared.cache_hit else ""),
        f"Rejected rows: `{prepared.rejects_path}`",
    ]
    if stats.tokens is not None:
        lines.append(
            f"Token lengths p50/p90/p99/max: {stats.tokens.p50}/{stats.tokens.p90}/{stats.tokens.p99}/"
            f"{stats.tokens.max}; {stats.truncated_share or 0:.1%} exceed cutoff_len {stats.cutoff_len}"
        )
    lines.extend(f"**warning:** {warning}" for warning in stats.warnings)
    return "\n\n".join(lines)

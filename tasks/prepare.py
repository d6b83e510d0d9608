"""Prefect task: prepare the datasets, publish their statistics, and record them in the MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from npu_sft.datasets import DataSettings, PreparedData, log_dataset_stats, prepare_datasets, stats_table_rows
from npu_sft.download import ModelSource, log_manifest
from npu_sft.download.datasets import with_downloaded_datasets
from npu_sft.runs import RunContext

STATS_ARTIFACT_KEY = "dataset-stats"


@task(name="download-datasets", cache_policy=NO_CACHE)
def download_datasets_task(settings: DataSettings, model: ModelSource | None, run: RunContext) -> DataSettings:
    """ModelScope dataset repositories, through the same pinned, cached, verified path as models; each one's
    manifest goes into the run, so it says exactly which data it trained on."""
    resolved, downloads = with_downloaded_datasets(settings, model)
    for name, downloaded in downloads:
        get_run_logger().info("dataset %s: %s @ %s in %s", name, downloaded.model_id, downloaded.resolved_revision, downloaded.path)
        log_manifest(run.tracker, downloaded, prefix=f"dataset.{name}")
    return resolved


# NO_CACHE: the prepared directory is already content-addressed (a re-run is a cache hit there), and the task records
# the statistics in the run, which a Prefect cache hit would skip.
@task(name="prepare-datasets", cache_policy=NO_CACHE)
def prepare_datasets_task(
    settings: DataSettings,
    *,
    val_size: float,
    cutoff_len: int,
    tokenizer_file: Path | None,
    out_root: Path,
    run: RunContext | None = None,
) -> PreparedData:
    """Validate, dedup, split and measure the data before any device is taken; fails on too many rejects."""
    logger = get_run_logger()
    prepared = prepare_datasets(
        settings, val_size=val_size, cutoff_len=cutoff_len, tokenizer_file=tokenizer_file, out_root=out_root
    )
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
    create_table_artifact(
        table=stats_table_rows(prepared.stats),
        key=STATS_ARTIFACT_KEY,
        description=_artifact_description(prepared),
    )
    if run is not None:
        log_dataset_stats(run.tracker, prepared)
    return prepared


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

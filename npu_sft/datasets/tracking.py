"""Recording dataset statistics in the pipeline's MLflow run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from npu_sft.datasets.output import DATASET_INFO_FILE, STATS_FILE
from npu_sft.datasets.stats import DatasetStats, LengthStats

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from npu_sft.datasets.prepare import PreparedData

ARTIFACT_DIR = "datasets"


def dataset_metrics(stats: DatasetStats) -> dict[str, float]:
    """Flat metric names (`data.*`, `data.<dataset>.*`) so runs compare in MLflow's table and charts."""
    metrics: dict[str, float] = {
        "data.total_rows": stats.total,
        "data.valid_rows": stats.valid,
        "data.rejected_rows": stats.rejected,
        "data.duplicate_rows": stats.duplicates,
        "data.train_rows": stats.train,
        "data.eval_rows": stats.eval,
        "data.reject_share": stats.reject_share,
    }
    metrics.update(_length_metrics("data.tokens", stats.tokens))
    if stats.truncated_share is not None:
        metrics["data.truncated_share"] = stats.truncated_share
    for source in stats.sources:
        prefix = f"data.{source.name}"
        metrics.update(
            {
                f"{prefix}.total_rows": source.total,
                f"{prefix}.valid_rows": source.valid,
                f"{prefix}.rejected_rows": source.rejected,
                f"{prefix}.duplicate_rows": source.duplicates,
                f"{prefix}.train_rows": source.train,
                f"{prefix}.eval_rows": source.eval,
            }
        )
        metrics.update(_length_metrics(f"{prefix}.tokens", source.tokens))
    return {name: float(value) for name, value in metrics.items()}


def _length_metrics(prefix: str, lengths: LengthStats | None) -> dict[str, float]:
    if lengths is None:
        return {}
    return {f"{prefix}_{name}": float(getattr(lengths, name)) for name in ("min", "mean", "p50", "p90", "p99", "max")}


def log_dataset_stats(client: MlflowClient, run_id: str, prepared: PreparedData) -> None:
    """Metrics, tags, and the stats JSON, rejects file and registration as artifacts under `datasets/`."""
    # Imported here: mlflow takes seconds to import and only this function needs it.
    from mlflow.entities import Metric, RunTag

    now_ms = int(time.time() * 1000)
    metrics = [Metric(name, value, now_ms, 0) for name, value in dataset_metrics(prepared.stats).items()]
    # Tags rather than params: params are write-once, and a resumed run may prepare again.
    tags = [
        RunTag("data.key", prepared.stats.key),
        RunTag("data.dir", str(prepared.dir)),
        RunTag("data.cache_hit", str(prepared.cache_hit).lower()),
    ]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    for path in (prepared.dir / STATS_FILE, prepared.rejects_path, prepared.dir / DATASET_INFO_FILE):
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)

"""Recording the prepared datasets (inputs) and their statistics in the pipeline's run (MLflow, through the `RunRecorder` the pipeline passes)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from npu_sft.datasets.output import DATASET_INFO_FILE, EVAL_DATASET, EVAL_FILE, STATS_FILE, TRAIN_DATASET, TRAIN_FILE
from npu_sft.datasets.stats import DatasetStats, LengthStats
from npu_sft.run_recorder import DatasetInput

if TYPE_CHECKING:
    from npu_sft.datasets.prepare import PreparedData
    from npu_sft.run_recorder import RunRecorder

ARTIFACT_DIR = "datasets"
# The recorded eval split, as LLaMA-Factory's `dataset_dir` reads it: enough to score an adapter on another host.
EVAL_SPLIT_ARTIFACTS = (f"{ARTIFACT_DIR}/{DATASET_INFO_FILE}", f"{ARTIFACT_DIR}/{EVAL_FILE}")


# The canonical sharegpt rows every prepared file holds (`output.dataset_registration`), in MLflow's column-spec JSON.
_MESSAGE = {"type": "object", "properties": {"from": {"type": "string", "required": True},
                                             "value": {"type": "string", "required": True}}}
CANONICAL_SCHEMA = [
    {"name": "conversations", "type": "array", "items": _MESSAGE, "required": True},
    {"name": "system", "type": "string", "required": True},
    {"name": "tools", "type": "string", "required": True},
]


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, shortened as MLflow shows digests."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def dataset_inputs(prepared: PreparedData) -> list[DatasetInput]:
    """The prepared train (and eval) files as the run's dataset inputs, named after their sources."""
    name = ",".join(source.name for source in prepared.stats.sources) or prepared.stats.key
    files = [(TRAIN_DATASET, TRAIN_FILE, prepared.stats.train)]
    if prepared.eval_dataset is not None:
        files.append((EVAL_DATASET, EVAL_FILE, prepared.stats.eval))
    return [
        DatasetInput(name, file_digest(prepared.dir / file), prepared.dir / file, rows, context, CANONICAL_SCHEMA)
        for context, file, rows in files
    ]


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


def log_dataset_stats(recorder: RunRecorder, prepared: PreparedData) -> None:
    """Dataset inputs, metrics, tags, and the stats JSON, rejects file, registration and eval split as artifacts under `datasets/`
    (the eval split, so that an adapter can be scored again from the run's record alone)."""
    recorder.log_metrics((name, value, 0) for name, value in dataset_metrics(prepared.stats).items())
    recorder.log_dataset_inputs(dataset_inputs(prepared))
    # Tags rather than params: params are write-once, and a resumed run may prepare again.
    recorder.set_tags(
        {"data.key": prepared.stats.key, "data.dir": str(prepared.dir), "data.cache_hit": str(prepared.cache_hit).lower()}
    )
    for path in (prepared.dir / STATS_FILE, prepared.rejects_path, prepared.dir / DATASET_INFO_FILE):
        recorder.log_artifact(path, ARTIFACT_DIR)
    if prepared.eval_dataset is not None:
        recorder.log_artifact(prepared.dir / EVAL_FILE, ARTIFACT_DIR)

"""What a pipeline stage records in its run, as a protocol: packages that record (datasets, download) depend on this,
not on MLflow. `npu_sft.tracking.RunTracker` is the implementation the pipeline passes them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Metric = tuple[str, float, int]  # (key, value, step)


@dataclass(frozen=True)
class DatasetInput:
    """A dataset a run read, as MLflow's Dataset column and dataset view show it."""

    name: str
    digest: str  # of the content: the same rows give the same digest
    path: Path
    rows: int
    context: str  # "train" or "eval"
    schema: list[dict[str, Any]]  # MLflow's column-spec JSON: [{"name": ..., "type": ..., "required": ...}]


class RunRecorder(Protocol):
    def log_metrics(self, metrics: Iterable[Metric]) -> None:
        """Numbers, each at its step; non-finite values are left out."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Strings the runs table can filter on; set again, a tag takes the new value."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or a directory's contents, under `artifact_path`."""

    def log_dict(self, document: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON (or YAML, by the file's suffix) document as an artifact file."""

    def log_table(self, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact the MLflow UI shows as a table."""

    def log_dataset_inputs(self, datasets: Iterable[DatasetInput]) -> None:
        """The datasets the run read, each with its context."""

"""What a training leaves: its attempts and the result handed to the train task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npu_sft.training.failures import Failure


@dataclass(frozen=True)
class Attempt:
    number: int
    config_file: Path
    resumed_from_step: int  # 0: from the beginning
    returncode: int
    wall_time_s: float
    last_step: int | None  # the newest step its trainer log reached
    failure: Failure | None
    records: tuple[dict[str, Any], ...] = ()  # what it appended to trainer_log.jsonl
    # A crash while the ranks shut down, after the training's final outputs were all written: not a failure.
    exit_crash: Failure | None = None

    @property
    def loop_time_s(self) -> float | None:
        """Time in the training loop up to its newest logged step (LLaMA-Factory's `elapsed_time`, whole seconds)."""
        times = [_seconds(r["elapsed_time"]) for r in self.records if isinstance(r.get("elapsed_time"), str)]
        known = [t for t in times if t is not None]
        return known[-1] if known else None


def _seconds(elapsed: str) -> float | None:
    """LLaMA-Factory's `str(timedelta(seconds=...))`: "0:01:05" or "1 day, 2:00:00"."""
    days = 0
    if "day" in elapsed:
        day_part, _, elapsed = elapsed.partition(", ")
        days = int(day_part.split()[0])
    parts = elapsed.split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True)
class TrainingResult:
    output_dir: Path
    wall_time_s: float  # the whole training: every attempt, and the waits between them
    log_file: Path
    records: list[dict[str, Any]]
    attempts: list[Attempt] = field(default_factory=list)
    peak_rank_rss_mb: float | None = None
    # Set when the training was complete in a checkpoint at its last step and the outputs were taken from there.
    finished_from_checkpoint: Path | None = None

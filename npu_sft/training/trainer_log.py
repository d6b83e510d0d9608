"""Following trainer_log.jsonl, the line per logged step LLaMA-Factory appends while it trains, as MLflow metrics."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from npu_sft.run_recorder import Metric

TRAINER_LOG = "trainer_log.jsonl"
STEP_METRIC_NAMES = {"loss": "loss", "lr": "learning_rate", "eval_loss": "eval_loss", "epoch": "epoch"}
# Written by LLaMA-Factory when RECORD_VRAM=1: the device allocator's peak so far, in GiB (0 on the CPU).
DEVICE_MEMORY_METRIC_NAMES = {
    "vram_allocated": "peak_device_memory_allocated_gb",
    "vram_reserved": "peak_device_memory_reserved_gb",
}
# Every key `step_metrics` can produce: what a re-run of the train task asks the run for, to log no step twice.
STEP_METRIC_KEYS = (*STEP_METRIC_NAMES.values(), *DEVICE_MEMORY_METRIC_NAMES.values())


class TrainerLogFollower:
    """Reads the complete lines LLaMA-Factory has appended to trainer_log.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = ""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        if self.path.stat().st_size < self._offset:
            # LLaMA-Factory deletes an old trainer log when it starts with overwrite_output_dir: start over.
            self._offset, self._partial = 0, ""
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished line stays until its newline arrives
        return [json.loads(line) for line in lines if line.strip()]


def step_metrics(record: Mapping[str, Any]) -> list[Metric]:
    """One trainer_log record as MLflow (key, value, step) triples."""
    step = int(record["current_steps"])
    metrics = [
        (name, float(record[key]), step)
        for key, name in STEP_METRIC_NAMES.items()
        if isinstance(record.get(key), (int, float))
    ]
    # The CPU reports 0 (and -1 reserved): no device memory to speak of, so nothing is logged.
    metrics += [
        (name, float(record[key]), step)
        for key, name in DEVICE_MEMORY_METRIC_NAMES.items()
        if isinstance(record.get(key), (int, float)) and record[key] > 0
    ]
    return metrics


class StepLedger:
    """The newest step logged per metric, so a resumed attempt that re-runs the steps after its checkpoint does not
    log those steps a second time: the loss curve keeps one point per step."""

    def __init__(self, logged: Mapping[str, int] | None = None):
        self._last: dict[str, int] = dict(logged or {})

    def new_only(self, metrics: Iterable[Metric]) -> list[Metric]:
        kept: list[Metric] = []
        for key, value, step in metrics:
            if step <= self._last.get(key, -1):
                continue
            self._last[key] = step
            kept.append((key, value, step))
        return kept

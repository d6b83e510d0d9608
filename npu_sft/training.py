"""LoRA SFT under torchrun in the engine env, and reading what LLaMA-Factory writes while and after it trains."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_sft import process
from npu_sft.engine import DistributedLaunch, EngineSettings, torchrun_train_command

TRAINER_LOG = "trainer_log.jsonl"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files LLaMA-Factory writes beside the adapter that a server or a later merge needs too.
ADAPTER_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "README.md")
STEP_METRIC_NAMES = {"loss": "loss", "lr": "learning_rate", "eval_loss": "eval_loss", "epoch": "epoch"}


class TrainerLogFollower:
    """Reads the complete lines LLaMA-Factory has appended to trainer_log.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = ""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("r", encoding="utf-8") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished line stays until its newline arrives
        return [json.loads(line) for line in lines if line.strip()]


def step_metrics(record: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """One trainer_log record as MLflow (key, value, step) triples."""
    step = int(record["current_steps"])
    return [
        (name, float(record[key]), step)
        for key, name in STEP_METRIC_NAMES.items()
        if isinstance(record.get(key), (int, float))
    ]


@dataclass(frozen=True)
class TrainingResult:
    output_dir: Path
    wall_time_s: float
    log_file: Path
    records: list[dict[str, Any]]


def run_training(
    engine: EngineSettings,
    launch: DistributedLaunch,
    config_file: Path,
    output_dir: Path,
    *,
    device_env: Mapping[str, str],
    log_file: Path,
    on_line: Callable[[str], None],
    on_records: Callable[[list[dict[str, Any]]], None],
    poll_interval_s: float = 1.0,
) -> TrainingResult:
    """Run one torchrun training to completion, following trainer_log.jsonl while it runs."""
    command = torchrun_train_command(engine, launch, config_file, env=device_env)
    follower = TrainerLogFollower(output_dir / TRAINER_LOG)
    records: list[dict[str, Any]] = []

    def poll() -> None:
        new = follower.read_new()
        if new:
            records.extend(new)
            on_records(new)

    stop = threading.Event()
    thread = process.follow_in_thread(poll, stop, poll_interval_s)
    try:
        completed = process.run_streaming(command.argv, env=command.env, log_file=log_file, on_line=on_line)
    finally:
        stop.set()
        thread.join()
    if not completed.ok:
        raise process.CommandFailed(completed, "training")
    return TrainingResult(output_dir, completed.wall_time_s, log_file, records)


def read_results(output_dir: Path) -> dict[str, float]:
    """LLaMA-Factory's final metrics (all_results.json), with perplexity derived from eval_loss."""
    results_file = output_dir / "all_results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} missing: the engine finished without writing its results")
    results = {key: float(value) for key, value in json.loads(results_file.read_text()).items() if isinstance(value, (int, float))}
    if "eval_loss" in results:
        eval_loss = results["eval_loss"]
        results["perplexity"] = math.exp(eval_loss) if eval_loss < 700 else math.inf
    return results


def collect_adapter(output_dir: Path, dest: Path) -> Path:
    """Copy the trained adapter (not the checkpoints) into `dest`, the directory that gets published."""
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir}: training wrote no {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES + ADAPTER_COMPANIONS:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, dest / name)
    return dest

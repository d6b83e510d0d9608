"""Figures of a whole training (attempts, time, throughput, memory), as MLflow metrics with tags naming their source.

    figures, sources = run_figures(result, world_size=lease.nproc_per_node, train_tokens_per_epoch=...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from npu_sft.training import TrainingResult


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_figures(
    result: TrainingResult, *, world_size: int, train_tokens_per_epoch: float | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Figures of the whole training, as MLflow metrics (`train/...`) and tags saying where each came from.

    LLaMA-Factory's samples/s divides ALL planned samples by the last attempt's runtime, which overstates the rate
    after a resume; here it is scaled by the share of the steps the last attempt actually ran. Tokens/s is
    LLaMA-Factory's (`include_effective_tokens_per_second: true`, per device, so times the world size) when it
    reports it, else `train_tokens_per_epoch` (from the dataset statistics) over the same time.
    """
    metrics: dict[str, float] = {
        "train/attempts": float(len(result.attempts)),
        "train/wall_time_s": result.wall_time_s,
    }
    tags: dict[str, str] = {}
    state = _read_json(result.output_dir / "trainer_state.json")
    train = _read_json(result.output_dir / "train_results.json")
    final_step = state.get("global_step")
    if isinstance(final_step, int):
        metrics["train/steps"] = float(final_step)
    runtime = train.get("train_runtime")
    resumed = result.attempts[-1].resumed_from_step if result.attempts else 0
    # A last attempt that resumed from the final checkpoint (its launcher had died after the ranks finished) ran no
    # steps: it measured no rate, so none is reported.
    ran_steps = final_step - resumed if isinstance(final_step, int) else 0
    if ran_steps > 0 and isinstance(runtime, (int, float)) and runtime > 0:
        ran_share = ran_steps / final_step
        metrics["train/loop_time_s"] = float(runtime)
        if isinstance(train.get("train_samples_per_second"), (int, float)):
            metrics["train/samples_per_s"] = float(train["train_samples_per_second"]) * ran_share
        epochs = train.get("epoch", state.get("epoch"))
        if isinstance(train.get("effective_tokens_per_sec"), (int, float)):
            metrics["train/tokens_per_s"] = float(train["effective_tokens_per_sec"]) * world_size * ran_share
            tags["train/tokens_per_s_source"] = "LLaMA-Factory effective tokens per second, times the world size"
        elif train_tokens_per_epoch is not None and isinstance(epochs, (int, float)):
            metrics["train/tokens_per_s"] = train_tokens_per_epoch * float(epochs) * ran_share / float(runtime)
            tags["train/tokens_per_s_source"] = "estimate: dataset statistics (mean tokens x train rows) x epochs"
    device_peaks = [
        float(r["vram_allocated"]) for r in result.records if isinstance(r.get("vram_allocated"), (int, float))
    ]
    if device_peaks and max(device_peaks) > 0:
        metrics["train/peak_device_memory_allocated_gb"] = max(device_peaks)
        tags["train/peak_device_memory_source"] = "torch allocator peak of rank 0 (LLaMA-Factory RECORD_VRAM)"
    if result.peak_rank_rss_mb is not None:
        metrics["train/peak_rank_host_rss_mb"] = result.peak_rank_rss_mb
        tags["train/peak_rank_host_rss_source"] = "largest VmHWM among the rank processes (/proc), host RAM"
    return {key: value for key, value in metrics.items() if math.isfinite(value)}, tags


def estimated_train_tokens_per_epoch(train_rows: int, mean_tokens: float | None, cutoff_len: int) -> float | None:
    """Rows x mean tokens per row, each row capped at cutoff_len as LLaMA-Factory truncates it."""
    if mean_tokens is None or train_rows <= 0:
        return None
    return train_rows * min(mean_tokens, float(cutoff_len))

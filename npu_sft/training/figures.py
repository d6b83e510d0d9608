"""Figures of a whole training (attempts, time, throughput, memory), as MLflow metrics with tags naming their source.

    figures, sources = run_figures(result, world_size=lease.nproc_per_node, train_tokens_per_epoch=...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from npu_sft.training.models import TrainingResult


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _own_train_results(result: TrainingResult) -> dict[str, Any]:
    """train_results.json, if the last attempt wrote it (its figures cover that attempt only; a file from an earlier
    attempt, or one the last attempt never reached, is not used)."""
    path = result.output_dir / "train_results.json"
    if not result.attempts or not path.is_file():
        return {}
    last = result.attempts[-1]
    started = last.config_file.stat().st_mtime if last.config_file.is_file() else None
    if started is not None and path.stat().st_mtime < started:
        return {}
    return _read_json(path)


@dataclass(frozen=True)
class _Span:
    """The steps one attempt trained that the finished training kept: (start, end], and its time in the loop."""

    start: int
    end: int
    loss_sum: float | None  # sum of the per-step losses over the span, where known
    loss_steps: int  # steps the loss sum covers
    loop_time_s: float | None
    steps_run: int  # steps it ran, including those a later attempt ran again


def _spans(result: TrainingResult, final_step: int, last_train: dict[str, Any]) -> list[_Span]:
    spans = []
    for index, attempt in enumerate(result.attempts):
        is_last = index == len(result.attempts) - 1
        # Steps after the checkpoint the next attempt resumed from were run again there: that attempt's count.
        kept_until = final_step if is_last else result.attempts[index + 1].resumed_from_step
        logged = [r for r in attempt.records if isinstance(r.get("current_steps"), int)]
        reached = max([attempt.resumed_from_step, *(r["current_steps"] for r in logged)])
        train_loss, runtime = _number(last_train.get("train_loss")), _number(last_train.get("train_runtime"))
        if is_last and train_loss is not None and runtime is not None:
            # transformers divides the loss summed over THIS attempt's steps by the global step, from the start.
            span_steps = final_step - attempt.resumed_from_step
            spans.append(_Span(attempt.resumed_from_step, final_step, train_loss * final_step, span_steps, runtime,
                               span_steps))
            continue
        # Each logged loss is the mean over the steps since the previous log (logging_steps of them).
        loss_sum, loss_steps, previous = 0.0, 0, attempt.resumed_from_step
        for record in logged:
            step, loss = record["current_steps"], _number(record.get("loss"))
            if step > kept_until:
                break
            if loss is not None and step > previous:
                loss_sum += loss * (step - previous)
                loss_steps += step - previous
                previous = step
        spans.append(_Span(attempt.resumed_from_step, min(reached, kept_until), loss_sum, loss_steps,
                           attempt.loop_time_s, max(reached - attempt.resumed_from_step, 0)))
    return spans


def _per_step(state: dict[str, Any], last_train: dict[str, Any], config: dict[str, Any], world_size: int,
              train_tokens_per_epoch: float | None) -> tuple[float | None, float | None, str | None]:
    """Samples and tokens one optimizer step processes, and where the token figure comes from."""
    max_steps = _number(state.get("max_steps")) or _number(state.get("global_step"))
    if not max_steps:
        return None, None, None
    runtime = _number(last_train.get("train_runtime"))
    samples = tokens = None
    source = None
    if runtime and (rate := _number(last_train.get("train_samples_per_second"))):
        samples = rate * runtime / max_steps  # LLaMA-Factory's rate is every planned sample over the runtime
    else:
        batch = [_number(config.get(key)) for key in ("per_device_train_batch_size", "gradient_accumulation_steps")]
        samples = batch[0] * (batch[1] or 1.0) * world_size if batch[0] else None
    if runtime and (rate := _number(last_train.get("effective_tokens_per_sec"))):
        tokens = rate * world_size * runtime / max_steps  # per device, over all planned tokens
        source = "LLaMA-Factory effective tokens per second, times the world size"
    elif train_tokens_per_epoch is not None and (
        epochs := _number(state.get("num_train_epochs")) or _number(last_train.get("epoch")) or _number(state.get("epoch"))
    ):
        tokens = train_tokens_per_epoch * epochs / max_steps
        source = "estimate: dataset statistics (mean tokens x train rows) x epochs"
    return samples, tokens, source


def run_figures(
    result: TrainingResult, *, world_size: int, train_tokens_per_epoch: float | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """Figures of the whole training across its attempts, as MLflow metrics and tags saying where each came from.

    `train_loss` is the mean of the per-step losses of every step the finished training kept (each step once, from
    the attempt whose result survived); `train_runtime`, `train/loop_time_s` the time in the training loop summed
    over the attempts; the rates are the steps actually run (re-run steps included: the devices did that work) over
    that time. transformers' own figures after a resume describe the last attempt alone (its loss summed over its
    steps but divided by all of them, every planned sample over its runtime), so they are not used as they are.
    Tokens/s is LLaMA-Factory's (`include_effective_tokens_per_second: true`, per device, so times the world size)
    when it reports it, else `train_tokens_per_epoch` (from the dataset statistics) per step.
    """
    metrics: dict[str, float] = {
        "train/attempts": float(len(result.attempts)),
        "train/wall_time_s": result.wall_time_s,
    }
    tags: dict[str, str] = {}
    state = _read_json(result.output_dir / "trainer_state.json")
    final_step = state.get("global_step")
    if isinstance(final_step, int) and final_step > 0 and result.attempts:
        metrics["train/steps"] = float(final_step)
        last_train = _own_train_results(result)
        spans = _spans(result, final_step, last_train)
        loss_steps = sum(span.loss_steps for span in spans)
        if loss_steps:
            metrics["train_loss"] = sum(span.loss_sum or 0.0 for span in spans) / loss_steps
            tags["train/loss_source"] = (
                f"mean per-step loss over {loss_steps} of {final_step} steps, {len(spans)} attempt(s)"
            )
        timed = [span for span in spans if span.loop_time_s is not None and span.steps_run > 0]
        loop_time = sum(span.loop_time_s or 0.0 for span in timed)
        steps_run = sum(span.steps_run for span in timed)
        metrics["train/steps_run"] = float(sum(span.steps_run for span in spans))
        if loop_time > 0 and steps_run > 0:
            config = _read_json_or_yaml(result.attempts[-1].config_file)
            samples, tokens, source = _per_step(state, last_train, config, world_size, train_tokens_per_epoch)
            metrics["train/loop_time_s"] = metrics["train_runtime"] = loop_time
            metrics["train_steps_per_second"] = steps_run / loop_time
            if samples is not None:
                metrics["train/samples_per_s"] = metrics["train_samples_per_second"] = samples * steps_run / loop_time
            if tokens is not None and source is not None:
                metrics["train/tokens_per_s"] = tokens * steps_run / loop_time
                tags["train/tokens_per_s_source"] = source
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


def _read_json_or_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def estimated_train_tokens_per_epoch(train_rows: int, mean_tokens: float | None, cutoff_len: int) -> float | None:
    """Rows x mean tokens per row, each row capped at cutoff_len as LLaMA-Factory truncates it."""
    if mean_tokens is None or train_rows <= 0:
        return None
    return train_rows * min(mean_tokens, float(cutoff_len))

"""Run figures, step de-duplication, the trainer-log follower across attempts and the rank memory sampler."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from npu_sft.training import (
    Attempt,
    RetryPolicy,
    StepLedger,
    TrainerLogFollower,
    TrainingResult,
    TrainingSettings,
    estimated_train_tokens_per_epoch,
    run_figures,
    step_metrics,
)
from npu_sft.training.rank_memory import RankMemorySampler


def test_device_memory_is_a_step_metric_only_where_the_device_reports_it() -> None:
    npu = {"current_steps": 10, "loss": 1.5, "vram_allocated": 41.2, "vram_reserved": 44.0}
    assert ("peak_device_memory_allocated_gb", 41.2, 10) in step_metrics(npu)
    cpu = {"current_steps": 10, "loss": 1.5, "vram_allocated": 0.0, "vram_reserved": -0.0}
    assert step_metrics(cpu) == [("loss", 1.5, 10)]


def test_ledger_drops_steps_already_logged() -> None:
    ledger = StepLedger({"loss": 4})
    assert ledger.new_only([("loss", 1.0, 2), ("loss", 1.0, 4), ("loss", 0.9, 6), ("eval_loss", 2.0, 4)]) == [
        ("loss", 0.9, 6),
        ("eval_loss", 2.0, 4),
    ]
    assert ledger.new_only([("loss", 0.8, 6), ("eval_loss", 1.9, 4)]) == []


def test_follower_starts_over_when_the_log_is_replaced(tmp_path: Path) -> None:
    log = tmp_path / "trainer_log.jsonl"
    log.write_text("".join(json.dumps({"current_steps": s}) + "\n" for s in (2, 4, 6)))
    follower = TrainerLogFollower(log)
    assert len(follower.read_new()) == 3
    log.write_text(json.dumps({"current_steps": 12}) + "\n")  # LLaMA-Factory deleted it and began anew
    assert follower.read_new() == [{"current_steps": 12}]


def _fake_proc(root: Path, pid: int, argv: list[str], hwm_kib: int) -> None:
    entry = root / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "status").write_text(f"Name:\tpython\nVmPeak:\t 9999999 kB\nVmHWM:\t{hwm_kib:>8} kB\nVmRSS:\t 1000 kB\n")


def test_memory_sampler_reads_the_ranks_high_water_mark(tmp_path: Path) -> None:
    config = "/runs/r1/llamafactory.yaml"
    proc = tmp_path / "proc"
    _fake_proc(proc, 100, ["python", "-m", "torch.distributed.run", "-m", "llamafactory.launcher", config], 900_000)
    _fake_proc(proc, 101, ["python", "-u", "-m", "llamafactory.launcher", config], 300_000)
    _fake_proc(proc, 102, ["python", "-u", "-m", "llamafactory.launcher", config], 512_000)
    _fake_proc(proc, 200, ["python", "-u", "-m", "llamafactory.launcher", "/runs/other/llamafactory.yaml"], 800_000)
    (proc / "self").mkdir()
    sampler = RankMemorySampler(Path(config), proc_root=proc)
    sampler.sample()
    assert sampler.peak_mb == pytest.approx(500.0)  # rank 102; not the launcher (100), not another run (200)
    (proc / "102" / "status").unlink()  # the rank exited
    sampler.sample()
    assert sampler.peak_mb == pytest.approx(500.0)
    assert RankMemorySampler(Path(config), proc_root=tmp_path / "no-proc").peak_mb is None


def _result(output_dir: Path, attempts: list[Attempt], records: list[dict] | None = None) -> TrainingResult:
    records = records if records is not None else [r for attempt in attempts for r in attempt.records]
    return TrainingResult(output_dir, 95.0, output_dir / "train.log", records, attempts, peak_rank_rss_mb=812.5)


def _log(steps: range, loss: Callable[[int], float], seconds_per_step: float = 0.5, start: int = 0) -> tuple:
    """trainer_log.jsonl records as LLaMA-Factory writes them: the mean loss since the previous log, whole seconds."""
    return tuple(
        {"current_steps": step, "loss": loss(step), "elapsed_time": str(timedelta(seconds=int((step - start) * seconds_per_step)))}
        for step in steps
    )


def _attempt(number: int, resumed: int, failed: bool = False, records: tuple = ()) -> Attempt:
    return Attempt(number, Path("cfg.yaml"), resumed, 1 if failed else 0, 40.0, 51, None, records)


def _final_state(output_dir: Path, **extra: object) -> None:
    (output_dir / "trainer_state.json").write_text(json.dumps({"global_step": 51, "max_steps": 51, **extra}))


def test_figures_of_an_uninterrupted_run(tmp_path: Path) -> None:
    _final_state(tmp_path)
    (tmp_path / "train_results.json").write_text(json.dumps(
        {"epoch": 1.0, "train_loss": 2.25, "train_runtime": 2.7075, "train_samples_per_second": 149.952}
    ))
    figures, sources = run_figures(_result(tmp_path, [_attempt(1, 0)]), world_size=2, train_tokens_per_epoch=20_300)
    assert figures["train/steps"] == 51 and figures["train/attempts"] == 1 and figures["train/wall_time_s"] == 95.0
    assert figures["train_loss"] == pytest.approx(2.25)  # transformers' own figure: every step ran in this attempt
    assert figures["train/samples_per_s"] == pytest.approx(149.952) == figures["train_samples_per_second"]
    assert figures["train_runtime"] == figures["train/loop_time_s"] == pytest.approx(2.7075)
    assert figures["train/tokens_per_s"] == pytest.approx(20_300 / 2.7075)
    assert sources["train/tokens_per_s_source"].startswith("estimate")
    assert figures["train/peak_rank_host_rss_mb"] == 812.5 and "host RAM" in sources["train/peak_rank_host_rss_source"]
    assert "train/peak_device_memory_allocated_gb" not in figures  # the CPU reports none


def test_figures_after_a_resume_describe_the_whole_training(tmp_path: Path) -> None:
    # Attempt 1 logged steps 2..14 (loss 10 - step/10) and died; attempt 2 resumed from checkpoint-10 and finished.
    # transformers' train_loss there is the sum over steps 11..51 divided by 51; its samples/s puts all 408 planned
    # samples over its own 20.5 s.
    _final_state(tmp_path)
    (tmp_path / "train_results.json").write_text(json.dumps({
        "epoch": 1.0, "train_loss": 1.6, "train_runtime": 20.5, "train_samples_per_second": 408 / 20.5,
        "effective_tokens_per_sec": 500.0,
    }))
    first = _log(range(2, 15, 2), lambda step: 10.0 - step / 10, seconds_per_step=0.5)
    records = [*first, {"current_steps": 20, "vram_allocated": 12.5}, {"current_steps": 30, "vram_allocated": 13.25}]
    attempts = [_attempt(1, 0, True, first), _attempt(2, 10)]
    figures, sources = run_figures(_result(tmp_path, attempts, records), world_size=2)
    kept_first = sum((10.0 - step / 10) * 2 for step in range(2, 11, 2))  # steps 1..10; 11..14 ran again later
    assert figures["train_loss"] == pytest.approx((kept_first + 1.6 * 51) / 51)
    assert "51 of 51 steps, 2 attempt(s)" in sources["train/loss_source"]
    assert figures["train/attempts"] == 2 and figures["train/steps"] == 51
    assert figures["train/steps_run"] == 14 + 41  # steps 11..14 ran twice
    assert figures["train/loop_time_s"] == pytest.approx(7.0 + 20.5)  # "0:00:07" at step 14, then 20.5 s
    assert figures["train/samples_per_s"] == pytest.approx(8 * 55 / 27.5)  # 408 samples / 51 steps = 8 per step
    assert figures["train/tokens_per_s"] == pytest.approx(500.0 * 2 * 20.5 / 51 * 55 / 27.5)
    assert sources["train/tokens_per_s_source"].startswith("LLaMA-Factory")
    assert figures["train/peak_device_memory_allocated_gb"] == 13.25


def test_figures_when_the_last_attempt_wrote_no_results(tmp_path: Path) -> None:
    # The last attempt reached checkpoint-51 and died before train_results.json: the figures come from the logs, the
    # samples per step from the config's batch (4 per device x 2 ranks).
    _final_state(tmp_path, num_train_epochs=1.0)
    config = tmp_path / "llamafactory.attempt-2.yaml"
    config.write_text("per_device_train_batch_size: 4\ngradient_accumulation_steps: 1\n")
    first = _log(range(2, 21, 2), lambda step: 3.0)
    second = _log(range(22, 51, 2), lambda step: 1.0, start=20)
    attempts = [_attempt(1, 0, True, first), Attempt(2, config, 20, -6, 30.0, 50, None, second)]
    figures, _ = run_figures(_result(tmp_path, attempts), world_size=2, train_tokens_per_epoch=5100)
    assert figures["train_loss"] == pytest.approx((3.0 * 20 + 1.0 * 30) / 50)  # step 51 was never logged
    assert figures["train/steps_run"] == 20 + 30
    assert figures["train/loop_time_s"] == pytest.approx(10 + 15)
    assert figures["train/samples_per_s"] == pytest.approx(8 * 50 / 25)
    assert figures["train/tokens_per_s"] == pytest.approx(5100 / 51 * 50 / 25)


def test_train_results_older_than_the_last_attempt_are_not_used(tmp_path: Path) -> None:
    _final_state(tmp_path)
    (tmp_path / "train_results.json").write_text(json.dumps({"train_loss": 0.0, "train_runtime": 0.0006}))
    config = tmp_path / "llamafactory.attempt-2.yaml"
    config.write_text("per_device_train_batch_size: 4\n")
    os.utime(tmp_path / "train_results.json", (config.stat().st_mtime - 60,) * 2)
    attempts = [Attempt(2, config, 0, 0, 30.0, 50, None, _log(range(2, 51, 2), lambda step: 2.0))]
    figures, _ = run_figures(_result(tmp_path, attempts), world_size=1)
    assert figures["train_loss"] == pytest.approx(2.0) and figures["train/loop_time_s"] == 25


def test_figures_without_engine_results_still_report_attempts_and_time(tmp_path: Path) -> None:
    figures, _ = run_figures(_result(tmp_path, [_attempt(1, 0)]), world_size=1)
    assert set(figures) == {"train/attempts", "train/wall_time_s", "train/peak_rank_host_rss_mb"}


def test_token_estimate_caps_rows_at_cutoff_len() -> None:
    assert estimated_train_tokens_per_epoch(406, 50.5, 128) == pytest.approx(406 * 50.5)
    assert estimated_train_tokens_per_epoch(10, 300.0, 128) == 1280
    assert estimated_train_tokens_per_epoch(10, None, 128) is None


def test_retry_policy_comes_from_the_training_settings() -> None:
    policy = RetryPolicy.from_settings(TrainingSettings(max_attempts=5, device_settle_s=12))
    assert policy.max_attempts == 5 and policy.device_settle_s == 12
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=0)

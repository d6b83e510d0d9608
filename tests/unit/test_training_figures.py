"""Run figures, step de-duplication, the trainer-log follower across attempts and the rank memory sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu_sft.settings import TrainingSettings
from npu_sft.training import (
    Attempt,
    RankMemorySampler,
    RetryPolicy,
    StepLedger,
    TrainerLogFollower,
    TrainingResult,
    launch_env,
    step_metrics,
)
from npu_sft.training_figures import estimated_train_tokens_per_epoch, run_figures


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
    return TrainingResult(output_dir, 95.0, output_dir / "train.log", records or [], attempts, peak_rank_rss_mb=812.5)


def _attempt(number: int, resumed: int, failed: bool = False) -> Attempt:
    return Attempt(number, Path("cfg.yaml"), resumed, 1 if failed else 0, 40.0, 51, None)


def test_figures_of_an_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 51, "max_steps": 51}))
    (tmp_path / "train_results.json").write_text(
        json.dumps({"epoch": 1.0, "train_runtime": 2.7075, "train_samples_per_second": 149.952})
    )
    figures, sources = run_figures(_result(tmp_path, [_attempt(1, 0)]), world_size=2, train_tokens_per_epoch=20_300)
    assert figures["train/steps"] == 51 and figures["train/attempts"] == 1 and figures["train/wall_time_s"] == 95.0
    assert figures["train/samples_per_s"] == pytest.approx(149.952)
    assert figures["train/tokens_per_s"] == pytest.approx(20_300 / 2.7075)
    assert sources["train/tokens_per_s_source"].startswith("estimate")
    assert figures["train/peak_rank_host_rss_mb"] == 812.5 and "host RAM" in sources["train/peak_rank_host_rss_source"]
    assert "train/peak_device_memory_allocated_gb" not in figures  # the CPU reports none


def test_figures_after_a_resume_count_only_the_steps_the_last_attempt_ran(tmp_path: Path) -> None:
    # LLaMA-Factory divides all 406 planned samples by the resumed attempt's runtime; 31 of 51 steps ran in it.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 51}))
    (tmp_path / "train_results.json").write_text(json.dumps(
        {"epoch": 1.0, "train_runtime": 2.0922, "train_samples_per_second": 194.051, "effective_tokens_per_sec": 1000.0}
    ))
    records = [{"current_steps": 10, "vram_allocated": 12.5}, {"current_steps": 20, "vram_allocated": 13.25}]
    figures, sources = run_figures(_result(tmp_path, [_attempt(1, 0, True), _attempt(2, 20)], records), world_size=2)
    assert figures["train/attempts"] == 2
    assert figures["train/samples_per_s"] == pytest.approx(194.051 * 31 / 51)
    assert figures["train/tokens_per_s"] == pytest.approx(1000.0 * 2 * 31 / 51)
    assert sources["train/tokens_per_s_source"].startswith("LLaMA-Factory")
    assert figures["train/peak_device_memory_allocated_gb"] == 13.25


def test_figures_without_engine_results_still_report_attempts_and_time(tmp_path: Path) -> None:
    figures, _ = run_figures(_result(tmp_path, [_attempt(1, 0)]), world_size=1)
    assert set(figures) == {"train/attempts", "train/wall_time_s", "train/peak_rank_host_rss_mb"}


def test_token_estimate_caps_rows_at_cutoff_len() -> None:
    assert estimated_train_tokens_per_epoch(406, 50.5, 128) == pytest.approx(406 * 50.5)
    assert estimated_train_tokens_per_epoch(10, 300.0, 128) == 1280
    assert estimated_train_tokens_per_epoch(10, None, 128) is None


def test_launch_env_lets_cpu_runs_resume() -> None:
    assert launch_env("cpu") == {"RECORD_VRAM": "1", "ACCELERATE_TORCH_DEVICE": "cpu"}
    assert launch_env("npu") == {"RECORD_VRAM": "1"}


def test_retry_policy_comes_from_the_training_settings() -> None:
    policy = RetryPolicy.from_settings(TrainingSettings(max_attempts=5, device_settle_s=12))
    assert policy.max_attempts == 5 and policy.device_settle_s == 12
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=0)


def test_no_rate_from_an_attempt_that_ran_no_steps(tmp_path: Path) -> None:
    # torchrun was killed, its orphaned ranks finished; the retry resumed from checkpoint-51 and trained nothing.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 51}))
    (tmp_path / "train_results.json").write_text(json.dumps({"train_runtime": 0.01, "train_samples_per_second": 40600}))
    figures, _ = run_figures(_result(tmp_path, [_attempt(1, 0, True), _attempt(2, 51)]), world_size=2)
    assert figures["train/steps"] == 51 and "train/samples_per_s" not in figures

"""The in-run guards on what LLaMA-Factory writes: a diverged loss, a rank on the wrong device."""

from __future__ import annotations

import math

import pytest

from npu_sft.training.failures import FailureKind
from npu_sft.training.guards import RunGuard
from npu_sft.training.settings import GuardSettings


def record(step: int, loss: float) -> dict:
    # As LLaMA-Factory's LogCallback writes it (json.dumps turns a NaN loss into NaN, which json.loads reads back).
    return {"current_steps": step, "total_steps": 100, "loss": loss, "lr": 1e-4, "epoch": step / 100}


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0], ids=["nan", "inf", "zero"])
def test_a_bad_loss_for_the_configured_steps_in_a_row_is_a_divergence(bad: float) -> None:
    guard = RunGuard(GuardSettings(diverged_steps=3))
    assert guard.saw_records([record(5, 2.0), record(10, bad), record(15, bad)]) is None
    verdict = guard.saw_records([record(20, bad)])
    assert verdict is not None
    kind, evidence = verdict
    assert kind is FailureKind.DIVERGED
    assert evidence.startswith(f"loss {'0' if bad == 0 else str(bad)} at logged steps 10, 15, 20 (3 in a row, from step 10)")
    assert "learning_rate" in evidence  # says what to change


def test_a_good_loss_between_bad_ones_starts_the_count_again() -> None:
    guard = RunGuard(GuardSettings(diverged_steps=2))
    assert guard.saw_records([record(1, math.nan), record(2, 1.5), record(3, math.nan), record(4, 1.2)]) is None
    assert guard.saw_records([record(5, 0.0), record(6, math.nan)]) is not None


def test_evaluation_records_and_a_disabled_guard_never_stop_a_run() -> None:
    evaluation = {"current_steps": 10, "total_steps": 100, "eval_loss": math.nan}
    assert RunGuard(GuardSettings(diverged_steps=1)).saw_records([evaluation]) is None
    assert RunGuard(GuardSettings(enabled=False, diverged_steps=1)).saw_records([record(1, math.nan)]) is None


# LLaMA-Factory's parser logs this on every rank (torchrun prefixes the rank when it tees the output).
RANK_LINE = ("[rank{rank}]: [INFO|2026-12-06 06:00:00] llamafactory.hparams.parser:524 >> Process rank: {rank}, "
             "world size: 2, device: {device}, distributed training: True, compute dtype: torch.bfloat16")


@pytest.mark.parametrize(("kind", "device"), [("npu", "npu:0"), ("gpu", "cuda:0"), ("cpu", "cpu")])
def test_a_rank_on_its_leases_device_type_is_fine(kind: str, device: str) -> None:
    assert RunGuard(GuardSettings(), device_kind=kind).saw_line(RANK_LINE.format(rank=0, device=device)) is None


def test_a_rank_on_the_cpu_under_an_npu_lease_is_a_wrong_device() -> None:
    guard = RunGuard(GuardSettings(), device_kind="npu")
    assert guard.saw_line(RANK_LINE.format(rank=0, device="npu:0")) is None
    kind, evidence = guard.saw_line(RANK_LINE.format(rank=1, device="cpu"))
    assert kind is FailureKind.WRONG_DEVICE
    assert evidence.startswith("rank 1 runs on cpu while its lease holds npu devices: torch-npu is not imported")


def test_without_a_lease_kind_the_device_is_not_judged() -> None:
    assert RunGuard(GuardSettings()).saw_line(RANK_LINE.format(rank=0, device="cpu")) is None

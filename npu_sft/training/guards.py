"""In-run guards: an attempt that can only waste its devices is stopped as soon as it shows, and not retried.

    diverged      the loss is NaN, infinite or exactly 0 for `training.guards.diverged_steps` logged steps in a row.
                  910B runs with a wrong dtype or a broken kernel report loss 0 or NaN for step after step
                  (LLaMA-Factory issues #3344, #8439); the same config diverges the same way on a retry.
    wrong device  a rank reports `device: cpu` while the lease holds NPUs or GPUs: torch-npu not imported or CANN
                  not sourced in the engine env (#4159, #6461). Training goes on, on the CPU, for days, while the
                  cards idle.

The guard reads what the watchdog reads: the trainer log's records and the engine's output lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from npu_sft.training.failures import FailureKind
from npu_sft.training.settings import GuardSettings

# LLaMA-Factory's parser logs, on every rank: "Process rank: 0, world size: 2, device: npu:0, distributed ..."
_RANK_DEVICE = re.compile(r"Process rank: (\d+), world size: \d+, device: ([a-z]+)")
# The torch device type each lease kind must show.
_EXPECTED_DEVICE = {"npu": "npu", "gpu": "cuda", "cpu": "cpu"}
_WRONG_DEVICE_FIX = {
    "npu": "torch-npu is not imported or CANN is not sourced in the engine env (set engine.env_script to CANN's "
    "set_env.sh; torch.npu.is_available() must be True there)",
    "gpu": "the engine env's torch has no CUDA (install the CUDA build of torch there)",
    "cpu": "the engine env sees an accelerator the lease did not give it",
}


def _bad_loss(value: float) -> str | None:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    return None


class RunGuard:
    """Fed an attempt's trainer-log records and output lines; each feed answers a verdict, or None while all is well.
    Not thread-safe by itself: the caller serialises its calls."""

    def __init__(self, settings: GuardSettings, device_kind: str | None = None):
        self.settings = settings
        self._device_kind = device_kind
        self._bad_steps: list[tuple[int, str]] = []  # the newest run of logged steps with a bad loss

    def saw_records(self, records: Iterable[Mapping[str, Any]]) -> tuple[FailureKind, str] | None:
        if not self.settings.enabled:
            return None
        for record in records:
            loss = record.get("loss")
            if not isinstance(loss, (int, float)) or "current_steps" not in record:
                continue  # an evaluation record, or a step without a training loss
            bad = _bad_loss(float(loss))
            if bad is None:
                self._bad_steps.clear()
                continue
            self._bad_steps.append((int(record["current_steps"]), bad))
            if len(self._bad_steps) >= self.settings.diverged_steps:
                return FailureKind.DIVERGED, self._describe_divergence()
        return None

    def _describe_divergence(self) -> str:
        steps = ", ".join(str(step) for step, _ in self._bad_steps)
        values = sorted({bad for _, bad in self._bad_steps})
        first = self._bad_steps[0][0]
        return (
            f"loss {' and '.join(values)} at logged steps {steps} ({len(self._bad_steps)} in a row, from step {first}); "
            "lower learning_rate, check bf16/fp16 against the device, or raise training.guards.diverged_steps"
        )

    def saw_line(self, line: str) -> tuple[FailureKind, str] | None:
        if not self.settings.enabled or self._device_kind is None:
            return None
        match = _RANK_DEVICE.search(line)
        if match is None:
            return None
        rank, device = int(match.group(1)), match.group(2)
        expected = _EXPECTED_DEVICE.get(self._device_kind)
        if expected is None or device == expected:
            return None
        return FailureKind.WRONG_DEVICE, (
            f"rank {rank} runs on {device} while its lease holds {self._device_kind} devices: "
            f"{_WRONG_DEVICE_FIX[self._device_kind]}"
        )

"""Errors of a training: it failed for good, or the cards never came free for a retry."""

from __future__ import annotations

from npu_sft.engine import process
from npu_sft.errors import NpuSftError
from npu_sft.training.failures import Failure
from npu_sft.training.models import Attempt


class TrainingFailed(process.CommandFailed):
    """Training failed for good: a failure that is not retried, attempts used up, or cards that never came free."""

    def __init__(self, completed: process.CompletedCommand, failure: Failure, attempts: list[Attempt], why: str):
        self.failure = failure
        self.attempts = attempts
        super().__init__(completed, "training")
        # The verdict first, then CommandFailed's exit code, log path and output tail.
        headline = f"training failed after {len(attempts)} attempt(s) ({why}): {failure.what}: {failure.evidence}"
        if failure.fix:
            headline += f" (fix: {failure.fix})"
        self.args = (f"{headline}\n{self.args[0]}",)


class DevicesStillBusy(NpuSftError, RuntimeError):
    """The previous training's processes did not leave the cards in time."""

from __future__ import annotations

from npu_sft.engine.process import CommandFailed, CompletedCommand
from npu_sft.errors import NpuSftError
from npu_sft.training import classify_failure


class EvaluationError(NpuSftError, RuntimeError):
    """The eval stage cannot run or its outputs are unusable; the message says which file and what to do."""


class PredictFailed(CommandFailed):
    """LLaMA-Factory's predict exited non-zero; the first line says why (out of memory, refused config, crash)."""

    def __init__(self, completed: CompletedCommand, what: str):
        super().__init__(completed, what)
        self.failure = classify_failure(completed.tail, completed.returncode)
        self.args = (f"{what} {self.failure.what}: {self.failure.evidence}\n{self.args[0]}",)

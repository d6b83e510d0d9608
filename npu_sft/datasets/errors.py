"""The one exception type of dataset preparation."""

from __future__ import annotations

from pathlib import Path

from npu_sft.errors import BadInputError


class DatasetError(BadInputError):
    """Dataset preparation cannot produce usable training data; the message says why and what to do.

    `rejects_path` points at the rejected rows (with their reasons) when the failure is about the rows themselves,
    so a caller can show it even though no prepared directory exists.
    """

    def __init__(self, message: str, *, rejects_path: Path | None = None) -> None:
        super().__init__(message)
        self.rejects_path = rejects_path

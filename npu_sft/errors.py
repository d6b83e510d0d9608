"""The project's one error family.

    NpuSftError        what npu-sft raises on purpose; its own bugs raise Python's exceptions
    └── BadInputError  the user's to fix (a config key, an override, a data file, a model id, a token, the host):
                       `npu-sft` prints it as one line and exits 2, Prefect's logs keep it without a traceback

`retryable` marks an error a later attempt may get past (a hub outage): it keeps its traceback.
"""

from __future__ import annotations


class NpuSftError(Exception):
    """An error npu-sft raises on purpose; the message says what failed and, where it can, what to do."""

    retryable: bool = False


class BadInputError(NpuSftError):
    """Something the user controls is wrong; the message is one line naming the file and key (or id, or path)."""

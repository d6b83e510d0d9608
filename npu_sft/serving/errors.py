"""Errors of serving."""

from __future__ import annotations

from npu_sft.errors import NpuSftError


class ServeError(NpuSftError, RuntimeError):
    """The API server did not start, or did not answer as it should; the message ends with its log."""

"""Errors of `make up` / `make down`."""

from __future__ import annotations

from npu_sft.errors import NpuSftError


class ServiceError(NpuSftError, RuntimeError):
    """A service could not be started or checked; the message says which and shows its log."""

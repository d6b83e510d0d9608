"""What can go wrong while building an engine command."""

from __future__ import annotations

from npu_sft.errors import BadInputError


class SecretInArgvError(BadInputError, ValueError):
    """The engine's command prefix cannot receive a secret without it showing in a command line."""


class EngineNotFound(BadInputError):
    """The engine's python is not on this host (engine.python)."""

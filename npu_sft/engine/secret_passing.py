"""How a secret reaches an engine behind a command prefix: by name only, never as a value in an argv (anyone on the
host reads argv in `ps`)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

SECRET_VARS = frozenset({"API_KEY"})
# Prefixes that take `-e NAME` after these subcommands and read its value from their own environment, which is ours.
_BY_NAME_TOOLS = ("docker", "podman")
_BY_NAME_SUBCOMMANDS = ("exec", "run")


def passes_secrets_by_name(prefix: Sequence[str]) -> bool:
    """`docker exec`/`podman exec` (or `run`): `-e API_KEY` without a value reads the key from their environment."""
    return by_name_position(prefix) is not None


def by_name_position(prefix: Sequence[str]) -> int | None:
    """Where `-e NAME` goes in a docker/podman prefix: right after its subcommand."""
    if not prefix or Path(prefix[0]).name not in _BY_NAME_TOOLS:
        return None
    return next((i + 1 for i, word in enumerate(prefix) if i > 0 and word in _BY_NAME_SUBCOMMANDS), None)


def secret_refusal(prefix: Sequence[str]) -> str:
    return (
        f"{shlex.join(prefix)!r} cannot receive the API key without showing it in a command line (`ps`); run the "
        "engine behind `docker exec` or `podman exec` (the key is passed by name, -e API_KEY), or locally"
    )

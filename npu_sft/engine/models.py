"""The values engine commands are built from and into."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DistributedLaunch:
    """Where one node's share of a torchrun job runs: the device lease sets nproc_per_node and the port."""

    nproc_per_node: int
    master_port: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"


@dataclass(frozen=True)
class ServedModel:
    """What the API server loads, and the name its `/v1/models` answers with."""

    name: str  # e.g. tiny-qwen2-lora:v3, so a client can tell which registered version it talks to
    base_model: str
    adapter: str
    template: str


def served_name(registered_model: str, version: str) -> str:
    return f"{registered_model}:v{version}"


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]  # for the local process; behind a prefix these are also forwarded in argv
    stdin_file: Path | None = None

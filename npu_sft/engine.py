"""The one place that builds engine command lines (argv, environment, stdin); it looks up the engine's python and
env script on this host, and runs nothing (`npu_sft.process` runs what it builds).

The engine (LLaMA-Factory, torch, deepspeed; torch-npu and CANN on Ascend) lives in its own environment, addressed as
a python executable, optionally behind a command prefix (`docker exec -i llamafactory`, `ssh host`) and an env
script (CANN's `set_env.sh`). Engine-side helper scripts are fed on stdin (`python - ARGS`), so they work the same
inside a container that does not have this project's files.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from npu_sft.errors import BadInputError
from npu_sft.serve_settings import ServeSettings

ENGINE_SCRIPTS = Path(__file__).parent / "engine_scripts"
DEFAULT_ENGINE_PYTHON = ".npu-sft/engine/bin/python"
# Handed to an engine behind a prefix by name only, never as a value in an argv (anyone on the host reads argv in `ps`)
SECRET_VARS = frozenset({"API_KEY"})
# Prefixes that take `-e NAME` after these subcommands and read its value from their own environment, which is ours.
_BY_NAME_TOOLS = ("docker", "podman")
_BY_NAME_SUBCOMMANDS = ("exec", "run")


class SecretInArgvError(BadInputError, ValueError):
    """The engine's command prefix cannot receive a secret without it showing in a command line."""


def passes_secrets_by_name(prefix: Sequence[str]) -> bool:
    """`docker exec`/`podman exec` (or `run`): `-e API_KEY` without a value reads the key from their environment."""
    return _by_name_position(prefix) is not None


def _by_name_position(prefix: Sequence[str]) -> int | None:
    """Where `-e NAME` goes in a docker/podman prefix: right after its subcommand."""
    if not prefix or Path(prefix[0]).name not in _BY_NAME_TOOLS:
        return None
    return next((i + 1 for i, word in enumerate(prefix) if i > 0 and word in _BY_NAME_SUBCOMMANDS), None)


def secret_refusal(prefix: Sequence[str]) -> str:
    return (
        f"{shlex.join(prefix)!r} cannot receive the API key without showing it in a command line (`ps`); run the "
        "engine behind `docker exec` or `podman exec` (the key is passed by name, -e API_KEY), or locally"
    )


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Before `python`: its check reads it (behind a prefix the python lives elsewhere and cannot be checked here).
    command_prefix: list[str] = Field(
        default_factory=list, description="Runs the engine elsewhere, e.g. ['docker', 'exec', '-i', 'llamafactory']."
    )
    python: str = Field(
        DEFAULT_ENGINE_PYTHON,
        description="The engine env's python. Relative paths are relative to the project directory.",
    )
    env_script: str | None = Field(None, description="Sourced before the engine starts, e.g. CANN's set_env.sh.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra variables, e.g. USE_MODELSCOPE_HUB: '1'.")

    @field_validator("python")
    @classmethod
    def _local_python_exists(cls, python: str, info: ValidationInfo) -> str:
        if info.data.get("command_prefix"):
            return python
        if os.sep not in python:
            if shutil.which(python) is None:
                raise ValueError(f"{python!r} is not on PATH; give the engine env's python path")
            return python
        path = Path(python)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ValueError(
                f"{python} does not exist or is not executable; run `make setup` to create the engine env, or set "
                "engine.python to your LLaMA-Factory env's python"
            )
        return python

    def missing_env_script(self) -> str | None:
        """The env script, when it should be on this host and is not (behind a prefix it lives elsewhere)."""
        if self.env_script and self.is_local and not Path(self.env_script).expanduser().is_file():
            return self.env_script
        return None

    @property
    def is_local(self) -> bool:
        return not self.command_prefix


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


def _wrap(engine: EngineSettings, inner: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Put the engine's env script and prefix around an engine argv."""
    argv = list(inner)
    prefix = list(engine.command_prefix)
    plain = {key: value for key, value in env.items() if key not in SECRET_VARS}
    if prefix and plain:
        # `docker exec`/`ssh` do not pass the caller's environment through, so it travels in argv via env(1).
        argv = ["env", *(f"{key}={value}" for key, value in sorted(plain.items())), *argv]
    if engine.env_script:
        # `$0` is the script and `"$@"` the engine argv: nothing is interpolated into shell text.
        argv = ["bash", "-c", 'source "$0" && exec "$@"', engine.env_script, *argv]
    secret = sorted(key for key in env if key in SECRET_VARS)
    if prefix and secret:
        at = _by_name_position(prefix)
        if at is None:
            raise SecretInArgvError(f"engine.command_prefix: {secret_refusal(prefix)}")
        # By name only; the value reaches docker through its own environment (EngineCommand.env).
        prefix[at:at] = [arg for key in secret for arg in ("-e", key)]
    return [*prefix, *argv]


def _command(
    engine: EngineSettings, inner: Sequence[str], env: Mapping[str, str] | None, stdin_file: Path | None = None
) -> EngineCommand:
    full_env = {**engine.env, **(env or {})}
    return EngineCommand(_wrap(engine, inner, full_env), full_env, stdin_file)


def torchrun_train_command(
    engine: EngineSettings, launch: DistributedLaunch, config_file: Path | str, env: Mapping[str, str] | None = None
) -> EngineCommand:
    """`torchrun ... llamafactory/launcher.py CONFIG`, exactly what `FORCE_TORCHRUN=1 llamafactory-cli train` runs."""
    inner = [
        engine.python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(launch.nnodes),
        "--node_rank",
        str(launch.node_rank),
        "--nproc_per_node",
        str(launch.nproc_per_node),
        "--master_addr",
        launch.master_addr,
        "--master_port",
        str(launch.master_port),
        "-m",
        "llamafactory.launcher",
        str(config_file),
    ]
    return _command(engine, inner, env)


def bare_train_command(engine: EngineSettings, config_file: Path | str, env: Mapping[str, str] | None = None) -> EngineCommand:
    """`llamafactory-cli train CONFIG` (it builds its own torchrun when FORCE_TORCHRUN/NPROC_PER_NODE say so)."""
    return _command(engine, [engine.python, "-m", "llamafactory.cli", "train", str(config_file)], env)


def export_command(engine: EngineSettings, config_file: Path | str, env: Mapping[str, str] | None = None) -> EngineCommand:
    """`llamafactory-cli export CONFIG`: the base model with the adapter merged in, written as safetensors shards."""
    return _command(engine, [engine.python, "-m", "llamafactory.cli", "export", str(config_file)], env)


def api_server_command(
    engine: EngineSettings,
    model: ServedModel,
    settings: ServeSettings,
    *,
    port: int,
    api_key: str,
    env: Mapping[str, str] | None = None,
) -> EngineCommand:
    """LLaMA-Factory's OpenAI-compatible server on `settings.backend`, bound to `settings.host` and guarded by
    `api_key`, listing `model.name`. `env`: the devices' and the backend's variables.

    API_VERBOSE=0 because LLaMA-Factory otherwise logs whole request bodies. MAX_CONCURRENT: the huggingface
    backend generates for that many requests at once (LLaMA-Factory's default is 1) and queues the rest.
    `--do_sample false` makes answers greedy unless a request asks otherwise: the seeds' fix for NPU error 507018.
    """
    inner = [
        engine.python,
        "-m",
        "llamafactory.cli",
        "api",
        "--model_name_or_path",
        model.base_model,
        "--adapter_name_or_path",
        model.adapter,
        "--template",
        model.template,
        "--finetuning_type",
        "lora",
        *settings.backend_args(),
    ]
    server_env = {
        "API_HOST": settings.host,
        "API_PORT": str(port),
        "API_KEY": api_key,
        "API_VERBOSE": "0",
        "API_MODEL_NAME": model.name,
        "MAX_CONCURRENT": str(settings.max_concurrent),
        **(env or {}),
    }
    return _command(engine, inner, server_env)


def engine_script_command(
    engine: EngineSettings, script: str, args: Sequence[str], env: Mapping[str, str] | None = None
) -> EngineCommand:
    """Run one of `npu_sft/engine_scripts/*.py` in the engine env, the script's text fed on stdin."""
    script_file = ENGINE_SCRIPTS / script
    if not script_file.is_file():
        raise FileNotFoundError(f"no engine script {script_file}")
    return _command(engine, [engine.python, "-", *args], env, stdin_file=script_file)


def render_command(command: EngineCommand, env_keys: Sequence[str] = ()) -> str:
    """A copy-pasteable shell line for `npu-sft plan` and logs; secrets are never part of `env_keys`."""
    import shlex

    shown = " ".join(f"{key}={shlex.quote(command.env[key])}" for key in env_keys if key in command.env)
    line = shlex.join(command.argv)
    if command.stdin_file is not None:
        line += f" < {shlex.quote(str(command.stdin_file))}"
    return f"{shown} {line}".strip()

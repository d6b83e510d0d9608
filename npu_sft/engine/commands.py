"""The one place that builds engine command lines (argv, environment, stdin); it runs nothing (`engine.process`
runs what it builds).

The engine (LLaMA-Factory, torch, deepspeed; torch-npu and CANN on Ascend) lives in its own environment, addressed as
a python executable, optionally behind a command prefix (`docker exec -i llamafactory`, `ssh host`) and an env
script (CANN's `set_env.sh`). Engine-side helper scripts are fed on stdin (`python - ARGS`), so they work the same
inside a container that does not have this project's files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from npu_sft.engine.errors import EngineNotFound, SecretInArgvError
from npu_sft.engine.models import DistributedLaunch, EngineCommand, ServedModel
from npu_sft.engine.secret_passing import SECRET_VARS, by_name_position, secret_refusal
from npu_sft.engine.settings import EngineSettings
from npu_sft.serve_settings import ServeSettings

ENGINE_SCRIPTS = Path(__file__).parent / "scripts"


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
        at = by_name_position(prefix)
        if at is None:
            raise SecretInArgvError(f"engine.command_prefix: {secret_refusal(prefix)}")
        # By name only; the value reaches docker through its own environment (EngineCommand.env).
        prefix[at:at] = [arg for key in secret for arg in ("-e", key)]
    return [*prefix, *argv]


def _command(
    engine: EngineSettings, inner: Sequence[str], env: Mapping[str, str] | None, stdin_file: Path | None = None
) -> EngineCommand:
    if (missing := engine.missing_python()) is not None:
        raise EngineNotFound(f"engine.python: {missing}")
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
    """Run one of `npu_sft/engine/scripts/*.py` in the engine env, the script's text fed on stdin."""
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

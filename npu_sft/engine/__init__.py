"""The engine (LLaMA-Factory, torch, deepspeed; torch-npu and CANN on Ascend) seen from the orchestrator: where it
lives, the command lines that run it, the one place that runs subprocesses, and the scripts it runs for us.

    command = torchrun_train_command(engine, launch, config_file, env=lease.env())
    process.run_streaming(command, on_line=log.info, log_file=log_file)

Modules: `settings` (EngineSettings), `models` (DistributedLaunch, ServedModel, EngineCommand), `commands` (every
engine argv), `secret_passing` (a secret behind a command prefix goes by name), `process` (runs every subprocess),
`errors`, `scripts/` (run in the engine env, fed on stdin). `llamafactory_config` (a run's exact engine YAML) and
`tiny_model` (the embedded default model) read the pipeline's settings, which import this package, so they are not
imported here.
"""

from npu_sft.engine.commands import (
    ENGINE_SCRIPTS,
    api_server_command,
    bare_train_command,
    engine_script_command,
    export_command,
    render_command,
    torchrun_train_command,
)
from npu_sft.engine.errors import EngineNotFound, SecretInArgvError
from npu_sft.engine.models import DistributedLaunch, EngineCommand, ServedModel, served_name
from npu_sft.engine.secret_passing import SECRET_VARS, passes_secrets_by_name, secret_refusal
from npu_sft.engine.settings import DEFAULT_ENGINE_PYTHON, EngineSettings

__all__ = [
    "DEFAULT_ENGINE_PYTHON",
    "ENGINE_SCRIPTS",
    "SECRET_VARS",
    "DistributedLaunch",
    "EngineCommand",
    "EngineNotFound",
    "EngineSettings",
    "SecretInArgvError",
    "ServedModel",
    "api_server_command",
    "bare_train_command",
    "engine_script_command",
    "export_command",
    "passes_secrets_by_name",
    "render_command",
    "secret_refusal",
    "served_name",
    "torchrun_train_command",
]

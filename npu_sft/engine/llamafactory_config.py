"""Turning a pipeline's LLaMA-Factory config into the exact YAML one run hands to the engine."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from npu_sft.engine import ENGINE_SCRIPTS, EngineSettings, engine_script_command, process
from npu_sft.settings import ConfigError, Pipeline, where_set

DEEPSPEED_SHORT_NAME = re.compile(r"^ds_z[0-3](_offload)?$")
# Keys that hold a credential end in one of these (hf_hub_token, ms_hub_token, ...); `max_new_tokens` does not.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api_?key)$", re.IGNORECASE)


def deepspeed_search_dirs(pipeline: Pipeline) -> list[Path]:
    return [pipeline.llamafactory_file.parent, pipeline.config_dir / "deepspeed", pipeline.config_dir.parent / "deepspeed"]


def resolve_deepspeed(value: str, pipeline: Pipeline) -> Path:
    """`ds_z2`, a path relative to the LLaMA-Factory YAML, or LLaMA-Factory's own `examples/deepspeed/ds_z0_config.json`
    (the seed's value), which maps to the project's copy of that file by name."""
    name = f"{value}_config.json" if DEEPSPEED_SHORT_NAME.match(value) else value
    as_given = Path(name).expanduser()
    if as_given.is_absolute() and as_given.is_file():
        return as_given
    for directory in deepspeed_search_dirs(pipeline):
        for candidate in (directory / name, directory / Path(name).name):
            if candidate.is_file():
                return candidate.resolve()
    raise ConfigError(
        f"{pipeline.llamafactory_file}: deepspeed: {value!r} not found (looked in "
        f"{', '.join(str(d) for d in deepspeed_search_dirs(pipeline))}); use ds_z0, ds_z2, ds_z3, ds_z2_offload, "
        "ds_z3_offload or a path to a DeepSpeed JSON"
    )


def resolve_train_config(
    pipeline: Pipeline, *, model_path: str, data_args: dict[str, Any], output_dir: Path
) -> dict[str, Any]:
    """The engine config for one run: the user's keys, with the places this run owns filled in.

    `data_args` comes from dataset preparation (`dataset_dir`, `dataset`, `eval_dataset`, `val_size`)."""
    config = dict(pipeline.llamafactory)
    config["model_name_or_path"] = model_path
    config.update(data_args)
    config["output_dir"] = str(output_dir)
    # One MLflow writer per run: the pipeline logs what the engine writes, the engine reports to nobody.
    config["report_to"] = "none"
    if config.get("deepspeed"):
        config["deepspeed"] = str(resolve_deepspeed(str(config["deepspeed"]), pipeline))
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be recorded or shown: hub tokens and other credentials left out."""
    return {key: value for key, value in config.items() if not SECRET_KEY.search(key)}


def loggable_params(config: dict[str, Any], max_len: int = 500) -> dict[str, str]:
    """LLaMA-Factory keys as MLflow params: hub tokens and other secrets left out, long values shortened."""
    params: dict[str, str] = {}
    for key, value in without_secrets(config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text if len(text) <= max_len else text[: max_len - 3] + "..."
    return params


def env_script_missing(pipeline: Pipeline) -> str | None:
    """One line naming `engine.env_script` when it should be on this host and is not; None when all is well."""
    script = pipeline.settings.engine.missing_env_script()
    if script is None:
        return None
    return (
        f"{pipeline.config_file}: engine.env_script: {script} does not exist on this host; on an Ascend host it is "
        "CANN's set_env.sh (install CANN, or give its path), elsewhere set engine.env_script: null"
    )


def check_with_engine(pipeline: Pipeline, *, without_missing_env_script: bool = False) -> None:
    """Parse the pipeline's LLaMA-Factory config with LLaMA-Factory's own argument parser in the engine env, before
    anything is downloaded or leased; ConfigError naming the user's file if it refuses it.

    A missing env script is a ConfigError too, unless `without_missing_env_script` (a plan made on a laptop for the
    Ascend host): then the config is parsed without sourcing it."""
    config, engine = _checked_inputs(pipeline, without_missing_env_script)
    verdict = _kept_verdict(pipeline, config, engine) or _engine_verdict(pipeline, config, engine)
    if not verdict["ok"]:
        raise ConfigError(_refusal(pipeline, verdict["error"]))


def engine_verdict_is_kept(pipeline: Pipeline) -> bool:
    """Whether `check_with_engine` would answer from its kept verdict, without starting the engine."""
    try:
        config, engine = _checked_inputs(pipeline, without_missing_env_script=False)
    except ConfigError:
        return True  # refused before the engine is asked: as quick as a kept verdict
    return _kept_verdict(pipeline, config, engine) is not None


CHECK_SCRIPT = "check_llamafactory_config.py"


def _checked_inputs(pipeline: Pipeline, without_missing_env_script: bool) -> tuple[dict[str, Any], EngineSettings]:
    """The config the engine checks and the engine that checks it; ConfigError when the engine can not start."""
    config = dict(pipeline.llamafactory)
    if config.get("deepspeed"):
        config["deepspeed"] = str(resolve_deepspeed(str(config["deepspeed"]), pipeline))
    engine = pipeline.settings.engine
    if (no_python := engine.missing_python()) is not None:
        raise ConfigError(f"{pipeline.config_file}: engine.python: {no_python}")
    if (missing := env_script_missing(pipeline)) is not None:
        if not without_missing_env_script:
            raise ConfigError(missing)
        engine = engine.model_copy(update={"env_script": None})
    return config, engine


def _verdict_file(pipeline: Pipeline, config: dict[str, Any], engine: EngineSettings) -> Path:
    """Where the engine's verdict on `config` is kept, by content: the config, the engine settings, the check script
    and the engine env's stamp, so that `plan`, `run` and the flow's own check of the same config start it once."""
    key = hashlib.sha256(
        json.dumps(
            {
                "config": config,
                "engine": engine.model_dump(mode="json"),
                "script": (ENGINE_SCRIPTS / CHECK_SCRIPT).read_text(encoding="utf-8"),
                "env": _engine_env_stamp(engine),
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:32]
    return pipeline.state_dir / "checks" / f"{key}.json"


def _kept_verdict(pipeline: Pipeline, config: dict[str, Any], engine: EngineSettings) -> dict[str, Any] | None:
    kept = _verdict_file(pipeline, config, engine)
    return json.loads(kept.read_text(encoding="utf-8")) if kept.is_file() else None


def _engine_verdict(pipeline: Pipeline, config: dict[str, Any], engine: EngineSettings) -> dict[str, Any]:
    """The engine's verdict on `config`, asked now and kept."""
    scratch_dir = pipeline.state_dir / "tmp"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=scratch_dir, delete=False, encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)
        config_file = Path(handle.name)
    try:
        command = engine_script_command(engine, CHECK_SCRIPT, [str(config_file)])
        completed = process.run_streaming(command.argv, env=command.env, stdin_file=command.stdin_file)
    finally:
        config_file.unlink(missing_ok=True)
    verdict = process.last_json_line(completed.tail)
    if not completed.ok or verdict is None:
        raise process.CommandFailed(completed, "checking the LLaMA-Factory config in the engine env")
    kept = _verdict_file(pipeline, config, engine)
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_suffix(".partial")
    partial.write_text(json.dumps(verdict), encoding="utf-8")
    partial.replace(kept)  # whole or absent: two processes checking at once both write the same verdict
    return verdict


def _engine_env_stamp(engine: EngineSettings) -> list[int]:
    """Changes when the local engine env is rebuilt or packages are installed into it (their directories change);
    an engine behind a command prefix (a container) is not looked into."""
    if not engine.is_local or "/" not in engine.python:
        return []
    python = Path(engine.python)
    paths = [python, *sorted(python.parent.parent.glob("lib/python*/site-packages"))]
    return [path.stat().st_mtime_ns for path in paths if path.exists()]


def _refusal(pipeline: Pipeline, error: str) -> str:
    """The engine's refusal naming where the key is set (errors of our check start with `key: `; LLaMA-Factory's own
    may name no key)."""
    key, sep, reason = error.partition(": ")
    if sep and key in pipeline.llamafactory:
        return f"{where_set(pipeline, key)}: {reason}"
    return f"{pipeline.llamafactory_file}: LLaMA-Factory refuses this config: {error}"

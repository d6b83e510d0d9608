"""Where the engine lives: its python, the prefix that reaches it, the env script sourced before it starts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

DEFAULT_ENGINE_PYTHON = ".npu-sft/engine/bin/python"


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
        if not info.data.get("command_prefix") and (problem := python_problem(python)) is not None:
            raise ValueError(problem)
        return python

    def missing_python(self) -> str | None:
        """Why the engine's python can not start on this host; None when it can (or lives behind a prefix).
        The default is not validated when the config is read (it may be made later, by `make setup`)."""
        return python_problem(self.python) if self.is_local else None

    def missing_env_script(self) -> str | None:
        """The env script, when it should be on this host and is not (behind a prefix it lives elsewhere)."""
        if self.env_script and self.is_local and not Path(self.env_script).expanduser().is_file():
            return self.env_script
        return None

    @property
    def is_local(self) -> bool:
        return not self.command_prefix


def python_problem(python: str) -> str | None:
    if os.sep not in python:
        return None if shutil.which(python) else f"{python!r} is not on PATH; give the engine env's python path"
    path = Path(python)
    if not path.is_file() or not os.access(path, os.X_OK):
        return (f"{python} does not exist or is not executable; run `make setup` to create the engine env, or set "
                "engine.python to your LLaMA-Factory env's python")
    return None

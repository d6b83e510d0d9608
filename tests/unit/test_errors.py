"""One error family: every exception npu-sft defines is an NpuSftError; the user's are BadInputErrors, which the CLI
ends with one line and exit 2 (the rest: one line, exit 1), and Prefect's logs keep without a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import pytest

import npu_sft
from npu_sft import cli, commands
from npu_sft.errors import BadInputError, NpuSftError
from npu_sft.serving import ServeError
from npu_sft.settings import ConfigError
from npu_sft.user_errors import is_user_error, user_error_names


def project_exceptions() -> list[type[BaseException]]:
    found = []
    for module_info in pkgutil.walk_packages(npu_sft.__path__, "npu_sft."):
        if ".engine.scripts" in module_info.name:  # run in the engine env
            continue
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and not issubclass(cls, Warning):
                found.append(cls)
    return found


def test_every_exception_the_project_defines_is_one_of_its_family() -> None:
    exceptions = project_exceptions()
    assert len(exceptions) > 20
    assert [cls.__qualname__ for cls in exceptions if not issubclass(cls, NpuSftError)] == []


def test_the_users_errors_are_bad_input_and_outages_are_not() -> None:
    names = user_error_names()
    # Once missing from a hand-kept list: a registry version, a Secret block, a command prefix leaking secrets.
    assert {"ConfigError", "DeviceError", "DatasetError", "HubNotFoundError", "PushError", "RegistryError",
            "SecretBlockError", "SecretInArgvError", "DeviceToolMissing"} <= names
    assert "HubUnavailableError" not in names and "ServeError" not in names and "TrainingFailed" not in names
    assert is_user_error(ConfigError("x")) and not is_user_error(ServeError("x")) and not is_user_error(None)


@pytest.mark.parametrize(
    ("error", "code"), [(ConfigError("pipeline.yaml:3: devices.train: bad"), 2), (ServeError("server gone\nlog"), 1)]
)
def test_the_cli_ends_an_error_of_the_family_as_its_message(
    error: NpuSftError, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def failing(args: object) -> int:
        raise error

    monkeypatch.setattr(commands, "run_command", failing)
    monkeypatch.delenv(cli.DEBUG_VAR, raising=False)
    assert cli.main(["devices"]) == code
    assert capsys.readouterr().err == f"npu-sft: error: {error}\n"
    monkeypatch.setenv(cli.DEBUG_VAR, "1")  # everything with its traceback
    with pytest.raises(type(error)):
        cli.main(["devices"])


def test_a_bug_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def buggy(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(commands, "run_command", buggy)
    with pytest.raises(KeyError):
        cli.main(["devices"])
    assert issubclass(BadInputError, NpuSftError)

"""`devices:` settings: defaults, accepted shapes, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from npu_sft.devices import DeviceSettings


def test_defaults() -> None:
    settings = DeviceSettings()

    assert settings.kind == "auto"
    assert (settings.train, settings.eval, settings.serve) == (1, 1, 1)
    assert settings.cpu_virtual_devices == 2
    assert settings.state_dir == Path.home() / ".cache" / "npu-sft" / "devices"  # one per host, shared by projects
    assert settings.lease_timeout_s > 0


def test_counts_and_id_lists_as_written_in_yaml() -> None:
    settings = DeviceSettings.model_validate(
        {"kind": "npu", "train": [0, 1, 2, 3], "eval": 1, "serve": [7], "lease_timeout_s": 120, "state_dir": "/x"}
    )

    assert settings.train == (0, 1, 2, 3)
    assert settings.request_for("train") == (0, 1, 2, 3)
    assert settings.request_for("serve") == (7,)
    assert settings.state_dir == Path("/x")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": 0}, "train\n  Value error, a device count must be a positive integer, got 0"),
        ({"eval": -2}, "eval\n  Value error, a device count must be a positive integer, got -2"),
        ({"serve": []}, "serve\n  Value error, a list of device ids must not be empty"),
        ({"train": [0, 1, 1]}, "device id 1 appears twice in [0, 1, 1]"),
        ({"train": [0, -1]}, "device ids must be non-negative integers, got -1 in [0, -1]"),
        ({"train": "4"}, "expected a device count (positive integer) or a list of device ids, got '4'"),
        ({"train": True}, "expected a device count (positive integer) or a list of device ids, got True"),
        ({"kind": "tpu"}, "kind\n  Input should be 'auto', 'npu', 'gpu' or 'cpu'"),
        ({"cpu_virtual_devices": 0}, "cpu_virtual_devices\n  Input should be greater than or equal to 1"),
        ({"lease_timeout_s": -1}, "lease_timeout_s\n  Input should be greater than or equal to 0"),
        ({"gpus": 2}, "gpus\n  Extra inputs are not permitted"),
        ({"master_port_range": [30000, 29000]}, "expected two ports 1024 <= low <= high <= 65535"),
        ({"kind": "cpu", "cpu_virtual_devices": 2, "eval": [2]}, "eval: CPU device ids must be below"),
    ],
)
def test_invalid_settings_name_the_field_and_the_problem(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        DeviceSettings.model_validate(values)

    assert message in str(raised.value)


def test_unknown_task_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'predict'; expected train, eval or serve"):
        DeviceSettings().request_for("predict")

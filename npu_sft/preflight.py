"""What a run checks on this host before anything starts, besides LLaMA-Factory's verdict on its config: the engine's
env script, the local data files and the device tool. `npu-sft run` checks it before Prefect starts; the flow checks
it again first, for runs started from a deployment (`prefect deployment run sft/qwen7b`), where no CLI ran before."""

from __future__ import annotations

from npu_sft.devices import DeviceToolMissing, take_inventory
from npu_sft.engine.llamafactory_config import env_script_missing
from npu_sft.settings import ConfigError, Pipeline, missing_data_file


def check_on_this_host(pipeline: Pipeline) -> None:
    """ConfigError naming the file and key of the first thing this host lacks; whether devices are free is the
    leases' to wait for."""
    for missing in (env_script_missing(pipeline), missing_data_file(pipeline)):
        if missing is not None:
            raise ConfigError(missing)
    try:
        take_inventory(pipeline.settings.devices)
    except DeviceToolMissing as err:
        raise ConfigError(f"{pipeline.config_file}: {err}") from None

"""`npu-sft doctor [CONFIG]`: this host checked for what a config needs before anything is downloaded or leased."""

from __future__ import annotations

from collections.abc import Mapping

from npu_sft.devices import DeviceError, DeviceSettings, resolve_kind
from npu_sft.doctor.ascend import check_cann, check_hccl
from npu_sft.doctor.devices import check_devices
from npu_sft.doctor.models import Finding
from npu_sft.settings import Pipeline


def diagnose(pipeline: Pipeline | None, environ: Mapping[str, str]) -> list[Finding]:
    """Every check for `pipeline` (or the default device settings without one), in the order a user fixes them."""
    settings = pipeline.settings.devices if pipeline is not None else DeviceSettings()
    findings = check_devices(settings, environ)
    try:
        kind = resolve_kind(settings.kind)
    except DeviceError:
        return findings
    if kind == "npu" and pipeline is not None:
        engine = pipeline.settings.engine
        findings += check_cann(engine, environ, pipeline.config_file)
        if _world_size(pipeline) > 1:
            findings += check_hccl(pipeline.llamafactory, pipeline.llamafactory_file, engine, environ)
    return findings


def _world_size(pipeline: Pipeline) -> int:
    train = pipeline.settings.devices.train
    per_node = train if isinstance(train, int) else len(train)
    return per_node * pipeline.settings.training.nnodes

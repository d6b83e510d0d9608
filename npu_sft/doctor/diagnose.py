"""`npu-sft doctor [CONFIG]`: this host checked for what a config needs before anything is downloaded or leased."""

from __future__ import annotations

from collections.abc import Mapping

from npu_sft.devices import DeviceError, DeviceSettings, Inventory, resolve_kind
from npu_sft.doctor.ascend import check_cann, check_hccl
from npu_sft.doctor.devices import check_devices, train_ids
from npu_sft.doctor.downloads import check_downloads
from npu_sft.doctor.engine_probe import probe_engine
from npu_sft.doctor.models import Finding
from npu_sft.doctor.services import check_mlflow, check_prefect
from npu_sft.settings import Pipeline


def diagnose(pipeline: Pipeline | None, environ: Mapping[str, str]) -> list[Finding]:
    """Every check for `pipeline` (or this host's devices and Prefect without one), in the order a user fixes them:
    the host, then what it must reach (the hub and the cache's disk, Prefect, MLflow)."""
    findings = diagnose_host(pipeline, environ)
    if pipeline is None:
        return [*findings, check_prefect()]
    return [*findings, *check_downloads(pipeline), check_prefect(), check_mlflow(pipeline, environ)]


def diagnose_host(pipeline: Pipeline | None, environ: Mapping[str, str]) -> list[Finding]:
    """The devices, CANN and the engine env of this host, without the network."""
    settings = pipeline.settings.devices if pipeline is not None else DeviceSettings()
    findings, inventory = check_devices(settings, environ)
    if pipeline is None:
        return findings
    engine = pipeline.settings.engine
    if _kind(settings, inventory) == "npu":
        findings += check_cann(engine, environ, pipeline.config_file)
        if _world_size(pipeline) > 1:
            findings += check_hccl(pipeline.llamafactory, pipeline.llamafactory_file, engine, environ)
    if inventory is not None and not any(finding.status == "error" for finding in findings):
        # Only on cards that passed the checks above: a probe on a missing or broken card says nothing new.
        findings += probe_engine(engine, inventory.kind, train_ids(settings, inventory))
    return findings


def _kind(settings: DeviceSettings, inventory: Inventory | None) -> str | None:
    if inventory is not None:
        return inventory.kind
    try:
        return resolve_kind(settings.kind)
    except DeviceError:
        return None


def _world_size(pipeline: Pipeline) -> int:
    train = pipeline.settings.devices.train
    per_node = train if isinstance(train, int) else len(train)
    return per_node * pipeline.settings.training.nnodes

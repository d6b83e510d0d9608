"""Registered adapter versions in the MLflow Model Registry: find one, and get its files onto this host."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from npu_sft.publishing.errors import RegistryError
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import client_for, tracking_uri

LATEST = "latest"
RUNS_PREFIX = "runs:/"  # MLflow's URI for a run's artifacts; here: the version published from that run
CHAMPION = "champion"  # the alias the publish gate gives a version that passed it
ADAPTER_MARKER = "adapter_config.json"  # what makes a directory a PEFT adapter


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered adapter version whose files are on this host."""

    name: str
    version: str  # a number, resolved from an alias or `latest`
    path: Path
    tags: Mapping[str, str] = field(default_factory=dict)  # the version's: base model and revision, template, ...

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def name_filter(name: str) -> str:
    """`name = '...'` for a registry search, in the quote the name does not contain (MLflow's filter strings have
    no escape); `publish.registered_model` refuses a name holding both."""
    quote = "'" if "'" not in name else '"'
    if quote in name:
        raise RegistryError(f"registered model name {name!r} holds both quote characters; MLflow cannot search for it")
    return f"name = {quote}{name}{quote}"


def resolve_version(settings: MlflowSettings, name: str, version: str) -> str:
    """A version number (checked to exist), `latest` (the highest number), an alias such as `champion` (also
    written `@champion`), which the publish gate moves, or `runs:/<run_id>`: the version published from that run."""
    client = client_for(settings)
    if version.startswith(RUNS_PREFIX):
        return _version_of_run(settings, name, version.removeprefix(RUNS_PREFIX).strip("/").split("/")[0])
    if version.isdigit():
        try:
            client.get_model_version(name, version)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            raise RegistryError(f"registered model {name!r} has no version {version} in {tracking_uri(settings)}") from None
        return version
    versions = client.search_model_versions(name_filter(name))
    if not versions:
        raise RegistryError(
            f"registered model {name!r} has no versions in {tracking_uri(settings)}: run the sft flow first"
        )
    if version == LATEST:
        return str(max(int(v.version) for v in versions))
    alias = version.removeprefix("@")
    aliased = client.get_registered_model(name).aliases.get(alias)
    if aliased is None:
        raise RegistryError(
            f"registered model {name!r} has no version with alias {alias!r}"
            + (" (no version has passed the publish gate yet)" if alias == CHAMPION else "")
            + f"; give a version number or {LATEST}"
        )
    return str(aliased)


def _version_of_run(settings: MlflowSettings, name: str, run_id: str) -> str:
    if not run_id.isalnum():  # also keeps the filter string below well-formed
        raise RegistryError(f"{RUNS_PREFIX}{run_id} is not an MLflow run id")
    versions = client_for(settings).search_model_versions(f"{name_filter(name)} and run_id = '{run_id}'")
    if not versions:
        raise RegistryError(
            f"run {run_id} published no version of {name!r} in {tracking_uri(settings)} (publish.enabled was false, "
            "or the run failed before the publish stage); give a version number, an alias or latest"
        )
    return str(min(int(v.version) for v in versions))  # publishing a run twice creates no second version


def run_of_version(settings: MlflowSettings, name: str, version: str) -> str:
    """The MLflow run that produced a registered version (`latest` allowed)."""
    resolved = resolve_version(settings, name, version)
    return str(client_for(settings).get_model_version(name, resolved).run_id)


def version_tags(settings: MlflowSettings, name: str, version: str) -> dict[str, str]:
    return dict(client_for(settings).get_model_version(name, version).tags)


def download_version(settings: MlflowSettings, name: str, version: str, dest: Path) -> Path:
    """The version's adapter files in `dest` (kept: a second serve of the same version downloads nothing)."""
    if (dest / ADAPTER_MARKER).is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier download that was interrupted
    partial.mkdir(parents=True)
    # The client's own lookup, not a `models:/` URI: that one is resolved against the process-wide registry URI.
    source = client_for(settings).get_model_version_download_uri(name, version)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial),
                                            tracking_uri=tracking_uri(settings))
    )
    if not (local / ADAPTER_MARKER).is_file():
        raise RegistryError(f"{name} version {version} holds no {ADAPTER_MARKER}; it is not a LoRA adapter")
    shutil.rmtree(dest, ignore_errors=True)
    # Renamed into place only when complete, so a crash mid-download never leaves a half adapter at `dest`.
    local.rename(dest)
    shutil.rmtree(partial, ignore_errors=True)
    return dest


def tag_version(settings: MlflowSettings, name: str, version: str, key: str, value: str) -> None:
    client_for(settings).set_model_version_tag(name, version, key, value[:5000])


SERVING_STATUS = "serving.status"  # up / stopped: whether the endpoint in serving.url answers for this version


def mark_serving(settings: MlflowSettings, name: str, version: str, *, url: str, model: str, flow_run: str) -> None:
    """Say on the version where it is being served: a team finds the endpoint from the registry."""
    client = client_for(settings)
    for key, value in (("serving.url", url), ("serving.model", model), ("serving.flow_run", flow_run)):
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, SERVING_STATUS, "up")


def mark_stopped(settings: MlflowSettings, name: str, version: str) -> None:
    client_for(settings).set_model_version_tag(name, version, SERVING_STATUS, "stopped")

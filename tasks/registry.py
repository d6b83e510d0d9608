"""Tasks over the MLflow Model Registry shared by the flows: which version an alias names, and its files here."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from npu_sft.publishing import registry
from npu_sft.settings import MlflowSettings, Pipeline


@task
def resolve_registered_version(settings: MlflowSettings, name: str, version: str) -> str:
    resolved = registry.resolve_version(settings, name, version)
    get_run_logger().info("%s %s is version %s", name, version, resolved)
    return resolved


def version_files_dir(pipeline: Pipeline, name: str, version: str) -> Path:
    """Where a registered version's files are kept on this host, downloaded once."""
    return pipeline.state_dir / "registry" / f"{name}-v{version}"


@task
def fetch_registered_adapter(pipeline: Pipeline, name: str, version: str) -> registry.RegisteredAdapter:
    """The version's adapter files under the state dir, downloaded once per host, and its tags."""
    dest = version_files_dir(pipeline, name, version)
    settings = pipeline.settings.mlflow
    path = registry.download_version(settings, name, version, dest)
    return registry.RegisteredAdapter(name, version, path, registry.version_tags(settings, name, version))

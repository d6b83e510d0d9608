"""The download's manifest in MLflow: tags to filter runs by model and commit, the file list as an artifact."""

from __future__ import annotations

from typing import TYPE_CHECKING

from npu_sft.download.core import DownloadedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient


def manifest_tags(downloaded: DownloadedModel, prefix: str | None = None) -> dict[str, str]:
    """`model.id`, `model.revision`, `model.resolved_revision`, ... (`dataset.*` for a dataset repository)."""
    prefix = prefix or downloaded.repo_type
    return {
        f"{prefix}.source": downloaded.source,
        f"{prefix}.id": downloaded.model_id,
        f"{prefix}.revision": downloaded.revision,
        f"{prefix}.resolved_revision": downloaded.resolved_revision,
        f"{prefix}.file_count": str(downloaded.file_count),
        f"{prefix}.total_bytes": str(downloaded.total_bytes),
    }


def log_manifest(client: MlflowClient, run_id: str, downloaded: DownloadedModel, prefix: str | None = None) -> None:
    """Tags on the run and `<prefix>_manifest.json` (`model_manifest.json` for a model) as an artifact."""
    # Imported here: mlflow takes seconds to import and the download itself does not need it.
    from mlflow.entities import RunTag

    prefix = prefix or downloaded.repo_type
    tags = [RunTag(key, value) for key, value in manifest_tags(downloaded, prefix).items()]
    client.log_batch(run_id, tags=tags)
    client.log_dict(run_id, downloaded.manifest_document(), f"{prefix}_manifest.json")

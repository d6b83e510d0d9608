"""The download's manifest in the pipeline's run: tags to filter runs by model and commit, the file list as an
artifact (MLflow, through the `RunRecorder` the pipeline passes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from npu_sft.download.core import DownloadedModel

if TYPE_CHECKING:
    from npu_sft.run_recorder import RunRecorder


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


def log_manifest(recorder: RunRecorder, downloaded: DownloadedModel, prefix: str | None = None) -> None:
    """Tags on the run and `<prefix>_manifest.json` (`model_manifest.json` for a model) as an artifact."""
    prefix = prefix or downloaded.repo_type
    recorder.set_tags(manifest_tags(downloaded, prefix))
    recorder.log_dict(downloaded.manifest_document(), f"{prefix}_manifest.json")

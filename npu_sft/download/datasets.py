"""ModelScope dataset repositories named in `data.datasets`, fetched through the same download path as models."""

from __future__ import annotations

from collections.abc import Callable

from npu_sft.datasets import DataSettings, DatasetSpec
from npu_sft.download.core import DownloadedModel, download_model
from npu_sft.download.settings import ModelSource

# Where a dataset repository comes from follows the model's hub settings, so a mirror or an offline cache
# configured once under `model:` serves the data too.
HUB_FIELDS = ("endpoint", "cache_dir", "offline", "require_pinned", "retries", "retry_backoff_s")


def dataset_repo_source(spec: DatasetSpec, model: ModelSource | None) -> ModelSource:
    inherited = {name: getattr(model, name) for name in HUB_FIELDS} if model and model.source == "modelscope" else {}
    return ModelSource(
        source="modelscope", id=spec.repo_id, repo_type="dataset", revision=spec.revision or "master", **inherited
    )


def with_downloaded_datasets(
    settings: DataSettings,
    model: ModelSource | None,
    download: Callable[[ModelSource], DownloadedModel] = download_model,
) -> tuple[DataSettings, list[tuple[str, DownloadedModel]]]:
    """`settings` with every not-yet-downloaded ModelScope dataset pointing at its downloaded directory, and the
    downloads by dataset name."""
    specs: list[DatasetSpec] = []
    downloads: list[tuple[str, DownloadedModel]] = []
    for spec in settings.datasets:
        if spec.source == "modelscope" and spec.path is None:
            downloaded = download(dataset_repo_source(spec, model))
            downloads.append((spec.name, downloaded))
            spec = spec.model_copy(update={"path": downloaded.path})
        specs.append(spec)
    return settings.model_copy(update={"datasets": specs}), downloads

"""Model directories already on this machine: checked in place (never copied), so a mistake fails here, not in
the middle of a training launch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from npu_sft.download.errors import LocalSourceError
from npu_sft.download.manifest import RECORD_FILE_NAME, ManifestEntry

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_directory(directory: Path) -> None:
    """A model directory has a config.json and weights; a sharded one has every shard its index names."""
    if not directory.is_dir():
        raise LocalSourceError(f"{directory}: not a directory")
    if not (directory / "config.json").is_file():
        raise LocalSourceError(f"{directory}: no config.json, so this is not a model directory")
    missing_shards = _missing_shards(directory)
    if missing_shards:
        raise LocalSourceError(
            f"{directory}: weight shards named by the index are missing: {', '.join(missing_shards)}"
        )
    if not any(path.suffix in WEIGHT_SUFFIXES for path in directory.iterdir() if path.is_file()):
        raise LocalSourceError(f"{directory}: no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise LocalSourceError(f"{directory}: no tokenizer ({', '.join(TOKENIZER_FILES)})")


def check_dataset_directory(directory: Path) -> None:
    if not directory.is_dir() or not any(directory.iterdir()):
        raise LocalSourceError(f"{directory}: not a directory, or empty")


def _missing_shards(directory: Path) -> list[str]:
    missing: set[str] = set()
    for index_name in WEIGHT_INDEX_FILES:
        index_path = directory / index_name
        if not index_path.is_file():
            continue
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError) as error:
            raise LocalSourceError(f"{index_path}: unreadable weight index ({error})") from error
        missing.update(shard for shard in set(weight_map.values()) if not (directory / shard).is_file())
    return sorted(missing)


def describe_directory(directory: Path) -> list[ManifestEntry]:
    """Files and sizes, without hashing: reading 15 GB on every run to describe a directory is not worth it."""
    entries = [
        ManifestEntry(path=path.relative_to(directory).as_posix(), size=path.stat().st_size)
        for path in directory.rglob("*")
        if path.is_file() and path.name != RECORD_FILE_NAME and not _is_hidden(path.relative_to(directory))
    ]
    return sorted(entries, key=lambda entry: entry.path)


def directory_fingerprint(entries: list[ManifestEntry], directory: Path) -> str:
    """A short id of the directory's current state (paths, sizes, mtimes), recorded as its 'revision'."""
    digest = hashlib.sha256()
    for entry in entries:
        mtime_ns = (directory / entry.path).stat().st_mtime_ns
        digest.update(f"{entry.path}\0{entry.size}\0{mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:16]


def _is_hidden(relative: Path) -> bool:
    # Skips .git, .cache and ModelScope's temporary files, which are not part of the model.
    return any(part.startswith(".") for part in relative.parts)

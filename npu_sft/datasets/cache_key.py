"""The content key of a preparation: the package's code, the settings, each input's digest and the tokenizer. Equal
keys mean an equal result, so a prepared directory named by its key is reused as it is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from npu_sft.datasets.errors import DatasetError
from npu_sft.datasets.reading import LoadedSource
from npu_sft.datasets.settings import DataSettings


def read_tokenizer(tokenizer_file: Path | None) -> str | None:
    if tokenizer_file is None:
        return None
    try:
        return tokenizer_file.read_text(encoding="utf-8")
    except OSError as err:
        raise DatasetError(f"{tokenizer_file}: cannot read the tokenizer ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise DatasetError(f"{tokenizer_file}: not a tokenizer.json (not UTF-8 text)") from err


def _code_fingerprint() -> str:
    """Digest of this package's source: a change to validation or layout must not reuse an old cache entry."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode())
        digest.update(module.read_bytes())
    return digest.hexdigest()


def content_key(
    settings: DataSettings,
    sources: list[LoadedSource],
    val_size: float,
    cutoff_len: int,
    tokenizer_json: str | None,
) -> str:
    material = {
        "code": _code_fingerprint(),
        "settings": settings.model_dump(mode="json", exclude={"dataset_info_dir"}),
        "inputs": [[source.spec.name, source.digests()] for source in sources],
        "val_size": val_size,
        "cutoff_len": cutoff_len,
        "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json is not None else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

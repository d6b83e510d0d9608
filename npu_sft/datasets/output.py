"""The prepared directory: its files, its LLaMA-Factory registration, and writing it atomically.

Layout of `<out_root>/<key>/` (key = content hash of inputs and settings):
    dataset_info.json   registers `train` (and `eval`) for LLaMA-Factory's `dataset_dir`
    train.jsonl         canonical sharegpt rows
    eval.jsonl          only when val_size > 0
    rejects.jsonl       one line per rejected row: source, file, row, line, reasons, codes, raw
    stats.json          DatasetStats
A directory is built under a temporary name and renamed into place, so `<key>/` exists only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from npu_sft.datasets.normalize import CANONICAL_TAGS
from npu_sft.datasets.stats import DatasetStats

TRAIN_DATASET = "train"
EVAL_DATASET = "eval"
DATASET_INFO_FILE = "dataset_info.json"
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
REJECTS_FILE = "rejects.jsonl"
STATS_FILE = "stats.json"
FAILED_DIR = "failed"  # <out_root>/failed/<key>/ keeps the rejects of a run that did not pass its gates

_TEMP_PREFIX = ".tmp-"
# A temp dir older than this belongs to a killed run (a live one takes seconds to minutes), so it may go.
_STALE_TEMP_SECONDS = 6 * 3600


def dataset_registration(file_name: str) -> dict[str, Any]:
    """One `dataset_info.json` entry for a canonical file, every column and tag spelled out."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": CANONICAL_TAGS["user"],
            "assistant_tag": CANONICAL_TAGS["assistant"],
            "observation_tag": CANONICAL_TAGS["observation"],
            "function_tag": CANONICAL_TAGS["function"],
            "system_tag": "system",
        },
    }


def dataset_info(has_eval: bool) -> dict[str, Any]:
    info = {TRAIN_DATASET: dataset_registration(TRAIN_FILE)}
    if has_eval:
        info[EVAL_DATASET] = dataset_registration(EVAL_FILE)
    return info


def write_lines(path: Path, lines: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for line in lines:
            handle.write(line)
            handle.write("\n")


def reject_line(record: dict[str, Any]) -> str:
    """A rejects-file line; a row with undecodable bytes is written with \\u escapes so the file stays UTF-8."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True)
    return line


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_stats(directory: Path, stats: DatasetStats) -> None:
    (directory / STATS_FILE).write_text(stats.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_stats(directory: Path) -> DatasetStats:
    return DatasetStats.model_validate_json((directory / STATS_FILE).read_text(encoding="utf-8"))


def new_temp_dir(out_root: Path, key: str) -> Path:
    out_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{key}-", dir=out_root))


def remove_stale_temp_dirs(out_root: Path) -> None:
    """Temp dirs of runs killed before they could clean up; never a finished (renamed) directory."""
    if not out_root.is_dir():
        return
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for entry in out_root.iterdir():
        if entry.name.startswith(_TEMP_PREFIX) and entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)


def publish(temp_dir: Path, final_dir: Path) -> bool:
    """Rename a complete temp dir into place. False when another process published the same key first (its
    content is identical by construction, so ours is dropped)."""
    try:
        os.rename(temp_dir, final_dir)
    except OSError as err:
        if final_dir.is_dir() and (final_dir / STATS_FILE).is_file():
            shutil.rmtree(temp_dir, ignore_errors=True)
            return False
        raise err
    return True


def replace_dir(temp_dir: Path, final_dir: Path) -> None:
    """Swap a complete temp dir in for an older one of the same name (used for failed runs' rejects)."""
    if final_dir.exists():
        retired = final_dir.with_name(f"{_TEMP_PREFIX}{final_dir.name}-old-{os.getpid()}")
        os.rename(final_dir, retired)
        shutil.rmtree(retired, ignore_errors=True)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(temp_dir, final_dir)

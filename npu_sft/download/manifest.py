"""The manifest of a download (files, sizes, sha256) and the checks that make a cached copy trustworthy.

Two small JSON files, both written atomically and only under the repository's download lock:

- `<download dir>/.npu_sft_manifest.json`, the record of that directory: the repository, the commit its files
  belong to, the hub's full file list at that commit, and a stamp (size, mtime) of every file verified so far.
  A later run trusts a file whose stamp still matches and re-hashes one whose stamp does not, so checking a
  15 GB model costs a few `stat` calls instead of a full read.
- `<cache>/.npu_sft/<type>s/<owner>--<name>/refs.json`: which commit a branch or tag resolved to last time and
  which directory holds each commit, so a pinned or offline run finds its copy without asking the hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

RECORD_FILE_NAME = ".npu_sft_manifest.json"
REFS_FILE_NAME = "refs.json"
HASH_BLOCK_SIZE = 8 * 1024 * 1024


class ManifestEntry(BaseModel):
    """One file of a download: its path inside the repository, its size, and its sha256 when the hub lists one."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str | None = None


class FileStamp(BaseModel):
    """What a file looked like on disk when its bytes were last verified."""

    size: int
    mtime_ns: int
    sha256: str | None = None


class DownloadRecord(BaseModel):
    """The on-disk record of one download directory (see the module docstring)."""

    format: int = 1
    repo_type: str
    model_id: str
    resolved_revision: str
    revisions: list[str] = []
    files: list[ManifestEntry]
    stamps: dict[str, FileStamp] = {}
    updated_at: float = 0.0


class RepoRefs(BaseModel):
    """refs.json: branch/tag name -> commit, and commit -> download directory."""

    revisions: dict[str, str] = {}
    directories: dict[str, str] = {}


@dataclass
class FileCheck:
    """The outcome of checking files against their manifest entries."""

    problems: list[str] = field(default_factory=list)
    stamps: dict[str, FileStamp] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.problems


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """The same matching as ModelScope's downloader: fnmatch, plus its legacy regex-like `.*` spelling."""
    return any(
        fnmatch.fnmatch(path, pattern) or (".*" in pattern and fnmatch.fnmatch(path, pattern.replace(".*", "*")))
        for pattern in patterns
    )


def select_files(
    files: Iterable[ManifestEntry], allow_patterns: Sequence[str] | None, ignore_patterns: Sequence[str] | None
) -> list[ManifestEntry]:
    selected = [
        entry
        for entry in files
        if (not allow_patterns or matches_any(entry.path, allow_patterns))
        and not (ignore_patterns and matches_any(entry.path, ignore_patterns))
    ]
    return sorted(selected, key=lambda entry: entry.path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(HASH_BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def check_files(
    directory: Path,
    expected: Sequence[ManifestEntry],
    known_stamps: dict[str, FileStamp],
    *,
    hash_unstamped: bool = True,
) -> FileCheck:
    """Compare files on disk with their entries.

    A file whose stamp still matches was verified before and is not read again. Any other file is hashed when the
    hub lists a sha256 (`hash_unstamped`); right after ModelScope's downloader finished, that was just done while
    streaming, so the caller passes False and only sizes are checked.
    """
    check = FileCheck()
    for entry in expected:
        target = directory / entry.path
        try:
            status = target.stat()
        except FileNotFoundError:
            check.problems.append(f"{entry.path}: missing")
            continue
        if status.st_size != entry.size:
            check.problems.append(f"{entry.path}: {status.st_size} bytes on disk, the hub lists {entry.size}")
            continue
        stamp = FileStamp(size=status.st_size, mtime_ns=status.st_mtime_ns, sha256=entry.sha256)
        if known_stamps.get(entry.path) == stamp:
            check.stamps[entry.path] = stamp
            continue
        if entry.sha256 and hash_unstamped:
            actual = sha256_of(target)
            if actual != entry.sha256:
                check.problems.append(f"{entry.path}: sha256 {actual[:12]}..., the hub lists {entry.sha256[:12]}...")
                continue
        check.stamps[entry.path] = stamp
    return check


def describe_problems(problems: Sequence[str], limit: int = 5) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def write_json_atomically(path: Path, document: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.replace(temporary, path)
    finally:
        # After a successful rename this is a no-op; after a failure it removes the half-written file.
        Path(temporary).unlink(missing_ok=True)


def read_record(directory: Path) -> DownloadRecord | None:
    """The record of a download directory; None when there is none or it is unreadable (then it is rebuilt)."""
    try:
        return DownloadRecord.model_validate_json((directory / RECORD_FILE_NAME).read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValidationError):
        return None


def write_record(directory: Path, record: DownloadRecord) -> Path:
    path = directory / RECORD_FILE_NAME
    record = record.model_copy(update={"updated_at": time.time()})
    write_json_atomically(path, record.model_dump(mode="json"))
    return path


def read_refs(metadata_dir: Path) -> RepoRefs:
    try:
        return RepoRefs.model_validate_json((metadata_dir / REFS_FILE_NAME).read_bytes())
    except (FileNotFoundError, ValidationError):
        return RepoRefs()


def remember_download(metadata_dir: Path, revision: str, resolved_revision: str, directory: Path) -> None:
    refs = read_refs(metadata_dir)
    refs.revisions[revision] = resolved_revision
    refs.directories[resolved_revision] = str(directory)
    write_json_atomically(metadata_dir / REFS_FILE_NAME, refs.model_dump(mode="json"))

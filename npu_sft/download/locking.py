"""One download per repository at a time, across processes: an fcntl.flock on a lock file in the cache directory.

flock (not a pid file) because the kernel releases it when the holder dies, so a flow killed mid-download never
leaves a stale lock behind; the next run takes the lock and resumes the partial files.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from npu_sft.download.errors import DownloadLockTimeout

LOCK_POLL_INTERVAL_S = 0.2
WAIT_NOTICE_INTERVAL_S = 60.0


def repo_metadata_dir(cache_dir: Path, repo_type: str, repo_id: str) -> Path:
    """npu-sft's own files for one repository, beside (not inside) ModelScope's cache layout."""
    return cache_dir / ".npu_sft" / f"{repo_type}s" / repo_id.replace("/", "--")


def repo_lock_path(cache_dir: Path, repo_type: str, repo_id: str) -> Path:
    return repo_metadata_dir(cache_dir, repo_type, repo_id) / "download.lock"


@contextmanager
def repo_download_lock(
    lock_path: Path,
    *,
    timeout_s: float,
    what: str,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; `on_wait` hears (once a minute) that another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, lock_path, timeout_s=timeout_s, what=what, on_wait=on_wait)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, lock_path: Path, *, timeout_s: float, what: str, on_wait: Callable[[str], None] | None) -> None:
    started = time.monotonic()
    next_notice = started
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now - started >= timeout_s:
            raise DownloadLockTimeout(
                f"{what}: another process has been downloading it for over {timeout_s:.0f} s "
                f"(lock {lock_path}); raise lock_timeout_s or check that process"
            )
        if on_wait is not None and now >= next_notice:
            on_wait(f"{what}: another process is downloading it; waiting for lock {lock_path}")
            next_notice = now + WAIT_NOTICE_INTERVAL_S
        time.sleep(LOCK_POLL_INTERVAL_S)

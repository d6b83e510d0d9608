"""Download progress: ModelScope's per-file callbacks summed into one byte count for the whole repository.

ModelScope instantiates each callback *class* once per file (`cls(filename, file_size)`) from its worker threads,
so the shared state lives in a `ByteProgress` the generated class closes over. Listeners (the rich console bar,
the Prefect progress artifact) are called at most once per percent or per `min_interval_s`, never per chunk.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from modelscope_hub import ProgressCallback
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@dataclass(frozen=True)
class DownloadProgress:
    """Bytes received so far for one download; `total_bytes` is the size of all selected files."""

    label: str
    done_bytes: int
    total_bytes: int

    @property
    def percent(self) -> float:
        if self.total_bytes <= 0:
            return 100.0
        return min(100.0, 100.0 * self.done_bytes / self.total_bytes)


ProgressListener = Callable[[DownloadProgress], None]


class ByteProgress:
    """Thread-safe byte counter that notifies listeners, throttled."""

    def __init__(self, label: str, total_bytes: int, listeners: list[ProgressListener], min_interval_s: float = 1.0):
        self._label = label
        self._total = total_bytes
        self._listeners = listeners
        self._min_interval_s = min_interval_s
        self._done = 0
        self._lock = threading.Lock()
        self._last_percent = -1.0
        self._last_time = 0.0

    def advance(self, size: int) -> None:
        # ModelScope reports a negative size when a server ignored a Range request and the file restarts.
        # Listeners run under the lock so that they see the counts in order, whichever thread reports.
        with self._lock:
            self._done = max(0, self._done + size)
            snapshot = self._snapshot_if_due()
            if snapshot is not None:
                self._notify(snapshot)

    def finish(self) -> None:
        with self._lock:
            self._done = self._total
            self._notify(DownloadProgress(self._label, self._done, self._total))

    def _snapshot_if_due(self) -> DownloadProgress | None:
        snapshot = DownloadProgress(self._label, self._done, self._total)
        now = time.monotonic()
        if snapshot.percent - self._last_percent < 1.0 and now - self._last_time < self._min_interval_s:
            return None
        self._last_percent, self._last_time = snapshot.percent, now
        return snapshot

    def _notify(self, snapshot: DownloadProgress) -> None:
        for listener in self._listeners:
            listener(snapshot)


def callback_class_for(progress: ByteProgress) -> type[ProgressCallback]:
    """A ProgressCallback subclass bound to `progress`, in the form ModelScope's `progress_callbacks` expects."""

    class ReportToByteProgress(ProgressCallback):
        def update(self, size: int) -> None:
            progress.advance(size)

    return ReportToByteProgress


class ConsoleProgressBar:
    """A rich progress bar (bytes, speed, time left) on stderr, fed by a ByteProgress listener."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(file=sys.stderr),
            # ModelScope's own tqdm output also goes to stderr; leave it alone rather than capture it.
            redirect_stderr=False,
            redirect_stdout=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ConsoleProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.stop()

    def update(self, snapshot: DownloadProgress) -> None:
        if self._task is None:
            self._task = self._progress.add_task(snapshot.label, total=snapshot.total_bytes)
        self._progress.update(self._task, completed=snapshot.done_bytes)

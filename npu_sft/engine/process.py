"""The one place that runs subprocesses: engine commands in the foreground (streamed) and servers in the background.

Never `shell=True`: every command is an argv list built by `npu_sft.engine`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_sft import host_processes
from npu_sft.errors import NpuSftError

# tqdm redraws its bar with carriage returns; those frames are noise in a task log.
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
TAIL_LINES = 200


@dataclass(frozen=True)
class CompletedCommand:
    argv: list[str]
    returncode: int
    tail: list[str]  # the last lines of combined output, for error reports and failure classification
    log_file: Path | None
    wall_time_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandFailed(NpuSftError, RuntimeError):
    def __init__(self, completed: CompletedCommand, what: str):
        self.completed = completed
        last = "\n".join(completed.tail[-15:])
        where = f" (full log: {completed.log_file})" if completed.log_file else ""
        super().__init__(f"{what} failed with exit code {completed.returncode}{where}:\n{last}")


def last_json_line(lines: Sequence[str]) -> dict[str, Any] | None:
    """The verdict an engine script prints as its last JSON line, among whatever else the engine logged."""
    for line in reversed(lines):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    return None


def is_progress_noise(line: str) -> bool:
    return bool(_PROGRESS_BAR.search(line))


def merged_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    if extra:
        env.update(extra)
    return env


def run_streaming(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_file: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    stdin_file: Path | None = None,
    orphan_grace_s: float = 10.0,
    stop: threading.Event | None = None,
) -> CompletedCommand:
    """Run a command to completion, sending each output line (stderr merged) to `on_line` and to `log_file`.

    The child gets its own process group so that stopping it (Ctrl+C, a cancelled flow run) also stops the
    torchrun workers it spawned. Setting `stop` SIGKILLs that group (a stalled training: hung ranks may never
    handle a SIGTERM, and stopped ones cannot).
    """
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    log = log_file.open("a", encoding="utf-8") if log_file is not None else None
    stdin = stdin_file.open("rb") if stdin_file is not None else None
    proc = subprocess.Popen(
        list(argv),
        env=merged_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    output_closed = threading.Event()
    threading.Thread(
        target=_stop_orphans_of, args=(proc, output_closed, orphan_grace_s), name="npu-sft-orphans", daemon=True
    ).start()
    if stop is not None:
        threading.Thread(target=_kill_when_stopped, args=(proc, stop), name="npu-sft-stop", daemon=True).start()
    try:
        if proc.stdout is None:
            raise RuntimeError("subprocess stdout pipe missing")
        for raw in proc.stdout:
            # A tqdm line holds many `\r`-separated frames; only the final frame is real.
            line = raw.rstrip("\n").split("\r")[-1]
            if log is not None:
                log.write(line + "\n")
                log.flush()
            tail.append(line)
            if on_line is not None and line.strip() and not is_progress_noise(line):
                on_line(line)
        output_closed.set()
        returncode = proc.wait()
    except BaseException:
        stop_process_group(proc)
        raise
    finally:
        output_closed.set()
        if log is not None:
            log.close()
        if stdin is not None:
            stdin.close()
    return CompletedCommand(list(argv), returncode, list(tail), log_file, time.monotonic() - started)


def _stop_orphans_of(proc: subprocess.Popen, output_closed: threading.Event, grace_s: float) -> None:
    """When the command's leader exits (torchrun killed, say) but its children still hold the output pipe open,
    kill what is left of them after `grace_s`, so the run ends now instead of when they finish.

    torchrun starts each rank in a session of its own, outside the command's process group, and an orphan is
    re-parented away from the leader: the leader's descendants are noted while it lives (with their start times,
    so a reused pid is never hit)."""
    known: list[tuple[int, int | None]] = []
    while True:
        try:
            proc.wait(timeout=_ORPHAN_LOOK_S)
            break
        except subprocess.TimeoutExpired:
            known = [(pid, host_processes.start_ticks(pid)) for pid in host_processes.descendants(proc.pid)]
    if output_closed.wait(grace_s):
        return
    host_processes.send_signal([pid for pid, ticks in known if host_processes.is_alive(pid, ticks)], signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group emptied in the meantime


_ORPHAN_LOOK_S = 1.0  # how often the leader's descendants are noted


def _kill_when_stopped(proc: subprocess.Popen, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if proc.poll() is not None:
            return
    # torchrun starts each rank in a session of its own: the group of the command does not reach them.
    host_processes.send_signal(host_processes.descendants(proc.pid), signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended on its own meanwhile


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the whole process group, then SIGKILL it if it is still there after the grace period."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(timeout=grace_s)


class BackgroundProcess:
    """A server started in its own process group, output to a log file, stopped with `stop()` or `with`."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None, log_file: Path, cwd: Path | None = None):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.argv = list(argv)
        self.log_file = log_file
        self._log = log_file.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=merged_env(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        try:
            stop_process_group(self.proc, grace_s)
        finally:
            self._log.close()

    def __enter__(self) -> BackgroundProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_background(
    argv: Sequence[str], *, env: Mapping[str, str] | None, log_file: Path, cwd: Path | None = None
) -> BackgroundProcess:
    return BackgroundProcess(argv, env=env, log_file=log_file, cwd=cwd)


def follow_in_thread(poll: Callable[[], None], stop: threading.Event, interval_s: float = 1.0) -> threading.Thread:
    """Call `poll` every `interval_s` until `stop` is set, then once more so nothing written last is missed."""

    def loop() -> None:
        while not stop.wait(interval_s):
            poll()
        poll()

    thread = threading.Thread(target=loop, name="npu-sft-follower", daemon=True)
    thread.start()
    return thread

"""A training that stops making progress is stopped and resumed, in minutes instead of at the collective timeout.

A hung device or a stuck collective looks the same from outside: the trainer log gets no new step, while
`ddp_timeout` (1800 s in the demo, 180000000 s in the seed recipe) and `HCCL_EXEC_TIMEOUT` (1800 s on Ascend) keep
every rank waiting. The watchdog follows the attempt's progress by phase, each with its own deadline:

    start-up     until the first logged step (model loading, tokenization)      stall.startup_s
    training     between logged steps: the longest interval seen so far        stall.step_factor x, at least
                 (learning the step time of this model on these devices)        stall.step_floor_s
    evaluating   from "***** Running Evaluation *****"                          stall.phase_s
    saving       from "Saving model checkpoint to"                              stall.phase_s

and on a stall says which rank stopped (stopped by a signal, or no CPU time spent) and where each rank's Python is
(`py-spy dump`), so the retry loop can stop the attempt's process group and resume from the newest complete
checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from npu_sft.engine import process
from npu_sft.training.settings import StallSettings

# What transformers' Trainer prints (at INFO, which LLaMA-Factory turns on) when a long phase starts.
EVALUATION_MARK = "***** Running Evaluation *****"
SAVING_MARK = "Saving model checkpoint to"



class Phase(str, Enum):
    STARTUP = "starting up (no step logged yet)"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving a checkpoint"


class ProgressWatchdog:
    """Fed the attempt's logged steps and output lines; `stall()` says when the current phase missed its deadline.
    Not thread-safe by itself: the caller serialises its calls.

    Steps arrive through the trainer log, read every poll, and phase marks through the output, at once: a step read
    within `settle_s` of a mark may have been written before it, so it does not end the phase.
    """

    def __init__(self, settings: StallSettings, clock: Callable[[], float], settle_s: float = 2.0):
        self.settings = settings
        self._clock = clock
        self._settle_s = settle_s
        self.phase = Phase.STARTUP
        self._since = clock()
        self._last_step_at: float | None = None
        self._longest_interval_s = 0.0

    def stepped(self) -> None:
        """A new step was logged."""
        now = self._clock()
        in_long_phase = self.phase in (Phase.EVALUATING, Phase.SAVING)
        if in_long_phase and now - self._since <= self._settle_s:
            return
        if self._last_step_at is not None:
            self._longest_interval_s = max(self._longest_interval_s, now - self._last_step_at)
        self._last_step_at = now
        self.phase, self._since = Phase.TRAINING, now

    def saw_line(self, line: str) -> None:
        for mark, phase in ((SAVING_MARK, Phase.SAVING), (EVALUATION_MARK, Phase.EVALUATING)):
            if mark in line:
                # The next interval between steps holds this phase: it says nothing about the step time.
                self.phase, self._since, self._last_step_at = phase, self._clock(), None
                return

    def deadline_s(self) -> float:
        settings = self.settings
        if self.phase is Phase.STARTUP:
            return settings.startup_s
        if self.phase is Phase.TRAINING:
            return max(settings.step_floor_s, settings.step_factor * self._longest_interval_s)
        return settings.phase_s

    def stall(self) -> str | None:
        """None while within the deadline; else what stalled, in one line."""
        waited = self._clock() - self._since
        deadline = self.deadline_s()
        if not self.settings.enabled or waited <= deadline:
            return None
        return f"no progress for {waited:.0f} s while {self.phase.value} (deadline {deadline:.0f} s)"


@dataclass(frozen=True)
class RankState:
    pid: int
    rank: str  # the RANK torchrun gave it ("?" when its environment cannot be read)
    state: str  # /proc/<pid>/stat's state letter: R running, S sleeping, T stopped, t traced, D disk wait, ...
    cpu_ticks: int  # user + system time


def rank_states(config_file: Path, proc_root: Path = Path("/proc")) -> list[RankState]:
    """The attempt's rank processes (torchrun starts them with the attempt's config as an argument), from /proc."""
    if not proc_root.is_dir():
        return []
    marker = str(config_file)
    states = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = [arg.decode("utf-8", "replace") for arg in (entry / "cmdline").read_bytes().split(b"\0")]
            if marker not in args or "llamafactory.launcher" not in args or "torch.distributed.run" in args:
                continue
            # The command name may hold spaces and parentheses: the fields that follow it start after the last ")".
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        rank = next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), "?")
        states.append(RankState(int(entry.name), rank, fields[0], int(fields[11]) + int(fields[12])))
    return sorted(states, key=lambda state: state.rank)


def stalled_ranks(before: list[RankState], after: list[RankState]) -> str:
    """Which ranks stopped, from two samples a moment apart: stopped by a signal, or no CPU time spent between them."""
    spent = {state.pid: state.cpu_ticks for state in before}
    stopped = [f"rank {s.rank} (pid {s.pid}) is stopped" for s in after if s.state in ("T", "t")]
    idle = [f"rank {s.rank} (pid {s.pid})" for s in after
            if s.state not in ("T", "t") and spent.get(s.pid) == s.cpu_ticks]
    if not after:
        return "no rank process found on this host"
    parts = stopped + ([f"{', '.join(idle)} spent no CPU time"] if idle else [])
    return "; ".join(parts) if parts else "every rank is still using CPU time (a slow phase, or a hang in the device)"


PY_SPY_TIMEOUT_S = 30.0  # per rank; a dump takes well under a second


def py_spy() -> str | None:
    """py-spy from the orchestrator's environment (a dependency), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def dump_rank_stacks(ranks: list[RankState], out_file: Path, py_spy_path: str | None = None) -> str:
    """Every rank's Python stacks into `out_file` (`py-spy dump --nonblocking`, which reads a stopped rank too: the
    blocking mode would try to pause it); returns one line saying where they are, or why they are not."""
    tool = py_spy_path or py_spy()
    if tool is None:
        return "no Python stacks: py-spy is not installed (pip install py-spy)"
    if not ranks:
        return "no Python stacks: no rank process found on this host"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for rank in ranks:
        with out_file.open("a", encoding="utf-8") as out:
            out.write(f"=== rank {rank.rank} (pid {rank.pid}, state {rank.state}) ===\n")
        timed_out = threading.Event()
        timer = threading.Timer(PY_SPY_TIMEOUT_S, timed_out.set)
        timer.start()
        try:
            completed = process.run_streaming([tool, "dump", "--nonblocking", "--pid", str(rank.pid)],
                                              log_file=out_file, stop=timed_out)
        finally:
            timer.cancel()
        if not completed.ok:
            reason = next((line for line in completed.tail if line.startswith("Error")), f"exit {completed.returncode}")
            failures.append(f"rank {rank.rank}: {reason}" + (_PTRACE_HINT if "ermission" in reason else ""))
    read = len(ranks) - len(failures)
    summary = f"Python stacks of {read} of {len(ranks)} ranks in {out_file}"
    return summary + (f" ({'; '.join(failures)})" if failures else "")


_PTRACE_HINT = " - reading another process needs ptrace: in a container add --cap-add SYS_PTRACE"

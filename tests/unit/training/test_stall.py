"""The stall watchdog: deadlines by phase, learned step time, and which rank stopped (from a /proc of our making)."""

from __future__ import annotations

from pathlib import Path

import pytest

from npu_sft.training.stall import (
    EVALUATION_MARK,
    SAVING_MARK,
    Phase,
    ProgressWatchdog,
    RankState,
    rank_states,
    stalled_ranks,
)
from npu_sft.training.settings import StallSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SETTINGS = StallSettings(startup_s=60, step_floor_s=5, step_factor=4, phase_s=30)


def test_start_up_has_its_own_deadline() -> None:
    clock = Clock()
    watchdog = ProgressWatchdog(SETTINGS, clock, settle_s=0)
    clock.now += 60
    assert watchdog.stall() is None
    clock.now += 1
    assert watchdog.stall() == "no progress for 61 s while starting up (no step logged yet) (deadline 60 s)"


def test_the_step_deadline_is_learned_from_the_intervals_seen_with_a_floor() -> None:
    clock = Clock()
    watchdog = ProgressWatchdog(SETTINGS, clock, settle_s=0)
    watchdog.stepped()
    assert watchdog.deadline_s() == 5  # nothing learned yet: the floor
    clock.now += 3
    watchdog.stepped()
    assert watchdog.deadline_s() == 12  # 4 x the longest interval
    clock.now += 12
    assert watchdog.stall() is None
    clock.now += 1
    assert watchdog.stall() == "no progress for 13 s while training (deadline 12 s)"
    watchdog.stepped()
    assert watchdog.stall() is None and watchdog.deadline_s() == 52


@pytest.mark.parametrize(("mark", "phase"), [(SAVING_MARK, Phase.SAVING), (EVALUATION_MARK, Phase.EVALUATING)])
def test_a_long_save_or_evaluation_is_not_a_stall_and_does_not_teach_the_step_time(mark: str, phase: Phase) -> None:
    clock = Clock()
    watchdog = ProgressWatchdog(SETTINGS, clock, settle_s=2)
    watchdog.stepped()
    clock.now += 1
    watchdog.stepped()
    watchdog.saw_line(f"[INFO|trainer.py:3815] 2026-12-05 23:57:25,206 >> {mark} /out/checkpoint-100")
    assert watchdog.phase is phase
    clock.now += 1
    watchdog.stepped()  # read from the trainer log now, but written before the mark: the phase goes on
    assert watchdog.phase is phase
    clock.now += 29
    assert watchdog.stall() is None  # 30 s in the phase: far past the 5 s step deadline, within phase_s
    clock.now += 1
    watchdog.stepped()
    assert watchdog.phase is Phase.TRAINING and watchdog.deadline_s() == 5  # the 31 s across the phase not learned


def test_disabled_never_stalls() -> None:
    clock = Clock()
    watchdog = ProgressWatchdog(StallSettings(enabled=False, startup_s=1), clock)
    clock.now += 1000
    assert watchdog.stall() is None


def fake_rank(proc: Path, pid: int, *, rank: str, state: str, cpu: tuple[int, int], config: str) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    argv = ["/env/bin/python", "-m", "llamafactory.launcher", config]
    (entry / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    # Fields after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    (entry / "stat").write_text(f"{pid} (pt_main thread) {state} 1 1 1 0 -1 0 0 0 0 0 {cpu[0]} {cpu[1]} 0 0\n")
    (entry / "environ").write_bytes(f"PATH=/bin\0RANK={rank}\0LOCAL_RANK={rank}\0".encode())


def test_the_ranks_are_found_with_their_rank_state_and_cpu_time(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_rank(proc, 11, rank="0", state="S", cpu=(500, 20), config="/runs/a/attempt-2.yaml")
    fake_rank(proc, 12, rank="1", state="T", cpu=(480, 25), config="/runs/a/attempt-2.yaml")
    fake_rank(proc, 13, rank="0", state="R", cpu=(1, 1), config="/runs/other/attempt-1.yaml")  # another training
    (proc / "self").mkdir()
    assert rank_states(Path("/runs/a/attempt-2.yaml"), proc) == [
        RankState(11, "0", "S", 520), RankState(12, "1", "T", 505)
    ]


def test_the_stalled_rank_is_named() -> None:
    before = [RankState(11, "0", "S", 520), RankState(12, "1", "T", 505), RankState(14, "2", "S", 300)]
    after = [RankState(11, "0", "S", 530), RankState(12, "1", "T", 505), RankState(14, "2", "S", 300)]
    assert stalled_ranks(before, after) == "rank 1 (pid 12) is stopped; rank 2 (pid 14) spent no CPU time"
    busy = [RankState(11, "0", "R", 600)]
    assert stalled_ranks([RankState(11, "0", "R", 520)], busy).startswith("every rank is still using CPU time")
    assert stalled_ranks([], []) == "no rank process found on this host"


def test_the_stacks_of_a_stopped_rank_are_read(tmp_path: Path) -> None:
    """py-spy, for real, on a SIGSTOPped Python process: the blocking mode would try to pause it and fail."""
    import signal
    import subprocess
    import sys
    import time

    from npu_sft.training.stall import RankState, dump_rank_stacks

    rank = subprocess.Popen([sys.executable, "-c", "import time\ndef waiting_in_a_collective():\n    time.sleep(60)\n"
                             "waiting_in_a_collective()"])
    try:
        time.sleep(1.0)  # the interpreter is up
        rank.send_signal(signal.SIGSTOP)
        out = tmp_path / "stacks.txt"
        summary = dump_rank_stacks([RankState(rank.pid, "1", "T", 0)], out)
        if "needs ptrace" in summary:  # a container without SYS_PTRACE: the evidence must say so, and how to fix it
            assert "--cap-add SYS_PTRACE" in summary and summary.startswith("Python stacks of 0 of 1 ranks")
            return
        assert summary == f"Python stacks of 1 of 1 ranks in {out}"
        text = out.read_text()
        assert text.startswith(f"=== rank 1 (pid {rank.pid}, state T) ===")
        assert "waiting_in_a_collective" in text
    finally:
        rank.kill()
        rank.wait()


def test_without_py_spy_or_ranks_the_stacks_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from npu_sft.training import stall

    monkeypatch.setattr(stall, "py_spy", lambda: None)
    assert stall.dump_rank_stacks([stall.RankState(1, "0", "S", 0)], tmp_path / "s.txt") == (
        "no Python stacks: py-spy is not installed (pip install py-spy)")
    monkeypatch.setattr(stall, "py_spy", lambda: "/bin/true")
    assert "no rank process found" in stall.dump_rank_stacks([], tmp_path / "s.txt")
    failed = stall.dump_rank_stacks([stall.RankState(1, "0", "S", 0)], tmp_path / "s.txt", py_spy_path="/bin/false")
    assert failed.startswith("Python stacks of 0 of 1 ranks") and "rank 0: exit 1" in failed

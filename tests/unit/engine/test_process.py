from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from npu_sft import host_processes
from npu_sft.engine.process import is_progress_noise, run_streaming, start_background


def test_streams_lines_without_progress_bars(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "print('loading model')\n"
        "sys.stdout.write(' 10%|#         | 1/10 [00:01<00:09]\\r 20%|##        | 2/10 [00:02<00:08]\\n')\n"
        "print(\"{'loss': 1.5, 'epoch': 0.1}\")\n"
        "sys.exit(3)\n"
    )
    seen: list[str] = []
    completed = run_streaming([sys.executable, "-c", script], log_file=tmp_path / "log.txt", on_line=seen.append)
    assert completed.returncode == 3 and not completed.ok
    assert seen == ["loading model", "{'loss': 1.5, 'epoch': 0.1}"]
    assert "20%" in (tmp_path / "log.txt").read_text()  # the log keeps everything, the task log only the signal
    assert completed.tail[-1] == "{'loss': 1.5, 'epoch': 0.1}"


def test_progress_noise_detection() -> None:
    assert is_progress_noise("  9%|█████████▊    | 126/1473 [01:15<13:13,  1.70it/s]")
    assert not is_progress_noise("{'loss': 0.9742, 'grad_norm': 30533.9, 'epoch': 0.22}")


def test_background_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The child spawns a grandchild (as torchrun spawns ranks); stopping must take both.
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    server = start_background([sys.executable, "-c", script], env=None, log_file=tmp_path / "bg.log")
    deadline = time.monotonic() + 10
    while not (tmp_path / "bg.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "bg.log").read_text().split()[0])
    server.stop(grace_s=5)
    assert server.exited() is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("grandchild survived stop()")


def test_orphans_holding_the_pipe_are_stopped_when_the_leader_dies(tmp_path: Path) -> None:
    # The leader (as torchrun) starts a child that inherits stdout and outlives it, then dies as if SIGKILLed.
    script = (
        "import os, signal, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('started', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    started = time.monotonic()
    completed = run_streaming([sys.executable, "-c", script], orphan_grace_s=1.0)
    assert completed.returncode == -9
    assert time.monotonic() - started < 30


def test_orphans_in_sessions_of_their_own_are_stopped_when_the_leader_dies(tmp_path: Path) -> None:
    # As torchrun starts its ranks: each in a new session, out of reach of the leader's process group.
    pid_file = tmp_path / "rank.pid"
    script = (
        "import os, signal, subprocess, sys, time\n"
        f"rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(rank.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(2.5)  # long enough for the supervisor to note the rank\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    started = time.monotonic()
    completed = run_streaming([sys.executable, "-c", script], orphan_grace_s=1.0)
    assert completed.returncode == -9
    assert time.monotonic() - started < 30
    rank = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while host_processes.is_alive(rank) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not host_processes.is_alive(rank), "the rank in its own session outlived its leader"

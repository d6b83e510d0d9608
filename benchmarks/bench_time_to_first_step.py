"""Benchmark the time to the first training step: `npu-sft run` of the demo against a bare `llamafactory-cli train`.

    python benchmarks/bench_time_to_first_step.py [--pairs 3] [--target-extra-s 5]

The pipeline side is the whole command a user types, `npu-sft run configs/tiny_cpu.yaml`, on a warm project (the
model generated, the datasets prepared and the engine's verdict on the config kept, as after a first run up to its
first step, untimed): CLI
start, config checks, Prefect's temporary server, MLflow run, download and preparation found in their caches, the
device lease, torchrun. The bare side is `FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train` of the engine
config that run wrote. Each side is timed from its start to the first line of the trainer's `trainer_log.jsonl`
(LLaMA-Factory writes it at the first logged step), then stopped. After an untimed warm-up of each, the order
alternates. Prints each time, the means and their difference; exits 1 when the pipeline needs more than
`--target-extra-s` seconds more than the engine alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from npu_sft import host_processes
from npu_sft.engine import EngineSettings, bare_train_command
from npu_sft.ports import unused_port

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
TRAINER_LOG = "trainer_log.jsonl"
TIMEOUT_S = 600.0


def time_to_first_step(argv: list[str], env: dict[str, str], cwd: Path, trainer_logs: Callable[[], list[Path]],
                       log: Path) -> float:
    """Seconds from starting `argv` to the first line of a trainer log; the command (ranks included) is then killed."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.monotonic() - started < TIMEOUT_S:
            if any(path.stat().st_size > 0 for path in trainer_logs()):
                return time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} ended (exit {proc.returncode}) before a first step; see {log}")
            time.sleep(0.05)
        raise TimeoutError(f"no first step in {TIMEOUT_S:.0f} s; see {log}")
    finally:
        # torchrun starts its ranks in sessions of their own: the command's group does not reach them.
        host_processes.send_signal(host_processes.descendants(proc.pid), signal.SIGKILL)
        host_processes.send_group_signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def pipeline_side(project: Path, engine_python: str, name: str) -> float:
    runs = project / ".npu-sft" / "runs"
    before = set(runs.glob(f"*/output/{TRAINER_LOG}")) if runs.is_dir() else set()
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "npu_sft.cli", "run", str(DEMO_CONFIG), "--set", f"engine.python={engine_python}",
            "--set", f"devices.state_dir={project / 'leases'}", "--set", "serve.enabled=false"]
    return time_to_first_step(argv, env, project, lambda: [p for p in runs.glob(f"*/output/{TRAINER_LOG}")
                                                           if p not in before], project / f"{name}.log")


def bare_side(engine: EngineSettings, config_file: Path, work: Path, name: str) -> float:
    output_dir = work / name
    config = config_file.read_text(encoding="utf-8")
    # The same engine config, writing to a fresh directory (a leftover checkpoint would make it resume).
    lines = [f"output_dir: {output_dir}" if line.startswith("output_dir:") else line for line in config.splitlines()]
    own_config = work / f"{name}.yaml"
    own_config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = bare_train_command(engine, own_config, env={
        "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(unused_port()),
        "PATH": f"{Path(engine.python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return time_to_first_step(command.argv, {**os.environ, **command.env}, work,
                              lambda: [output_dir / TRAINER_LOG] if (output_dir / TRAINER_LOG).exists() else [],
                              work / f"{name}.log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--target-extra-s", type=float, default=5.0)
    parser.add_argument("--engine-python", default=str(REPO / ".npu-sft" / "engine" / "bin" / "python"))
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards; a temporary dir otherwise")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-first-step-"))
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    print(f"logs in {work}")

    # Warm-up, untimed, with the timed runs' own settings: a first run up to its first step fills the caches (the model,
    # the prepared datasets, the engine's verdict on this very config) as a user's first run does.
    pipeline_side(project, args.engine_python, "warm-up-pipeline")
    (config_file,) = list((project / ".npu-sft" / "runs").glob("*/llamafactory.yaml"))
    engine = EngineSettings(python=args.engine_python)
    bare_side(engine, config_file, work, "warm-up-bare")

    pipeline_s: list[float] = []
    bare_s: list[float] = []
    for pair in range(args.pairs):
        sides = [("pipeline", lambda n: pipeline_s.append(pipeline_side(project, args.engine_python, n))),
                 ("bare", lambda n: bare_s.append(bare_side(engine, config_file, work, n)))]
        for side, run in sides if pair % 2 == 0 else reversed(sides):
            run(f"{side}-{pair}")
            print(f"pair {pair + 1}: {side:8s} first step after {(pipeline_s if side == 'pipeline' else bare_s)[-1]:.1f} s")
    extra = statistics.mean(pipeline_s) - statistics.mean(bare_s)
    print(f"time to first step: pipeline {statistics.mean(pipeline_s):.1f} s mean, bare {statistics.mean(bare_s):.1f} s"
          f" mean, the pipeline's extra {extra:+.1f} s (target <= {args.target_extra_s:.0f} s)")
    return 0 if extra <= args.target_extra_s else 1


if __name__ == "__main__":
    sys.exit(main())

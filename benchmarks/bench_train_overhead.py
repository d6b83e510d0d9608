"""Benchmark the train stage's overhead: the pipeline's `run_training` against a bare `llamafactory-cli train`.

    python benchmarks/bench_train_overhead.py [--epochs 40] [--pairs 2] [--target-ratio 1.05]

Both run the SAME generated LLaMA-Factory YAML (the demo pipeline's tiny model and datasets, epochs raised so the
training takes well over a minute) with 2 CPU ranks:

- pipeline: `npu_sft.training.run_training` exactly as the train task calls it (on a device lease, torchrun, output streamed into a
  logger and a log file, trainer_log.jsonl followed every second, each step logged to an MLflow run, ranks' memory
  sampled, the retry machinery armed);
- bare: `FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train CONFIG`, output to a file.

After one short untimed warm-up run of each, the order alternates (pipeline first, then bare first, ...), so
neither always runs on a warmer machine. Prints each run's wall time, the means and their ratio, and the
orchestrator's own CPU time during each pipeline run (the part of the overhead that does not depend on how busy the
machine is); exits 1 when the ratio is above the target.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from npu_sft.datasets import prepare_datasets
from npu_sft.devices import DeviceSettings, lease_devices
from npu_sft.engine import DistributedLaunch, EngineSettings, bare_train_command
from npu_sft.engine.llamafactory_config import resolve_train_config, write_config
from npu_sft.engine.tiny_model import ensure_tiny_model, tokenizer_file
from npu_sft.ports import unused_port
from npu_sft.settings import MlflowSettings, load_pipeline
from npu_sft.tracking import RunTracker
from npu_sft.training import RetryPolicy, TrainingSettings, launch_env, launch_on, run_figures, run_training

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
MIN_TRAINING_S = 60.0
WARM_UP_EPOCHS = 2


def train_devices(work: Path) -> tuple[DeviceSettings, TrainingSettings]:
    """The demo pipeline's devices (2 CPU train ranks), their leases kept in `work`, and its training settings."""
    settings = load_pipeline(DEMO_CONFIG).settings
    return settings.devices.model_copy(update={"state_dir": work / "leases"}), settings.training


@contextmanager
def train_launch(work: Path) -> Iterator[tuple[DistributedLaunch, dict[str, str]]]:
    """The launch and device variables the train task gives run_training, on a lease of the demo's devices."""
    devices, training = train_devices(work)
    with lease_devices(devices, task="train") as lease:
        yield launch_on(lease, training), {**lease.env(), **launch_env(lease.kind)}


def generate_config(
    work: Path, engine_python: str, epochs: int, name: str = "llamafactory.yaml", overrides: Sequence[str] = ()
) -> tuple[EngineSettings, Path, Path]:
    """The YAML the train task would write for the demo pipeline, with `epochs` epochs."""
    pipeline = load_pipeline(
        DEMO_CONFIG,
        [
            f"engine.python={engine_python}",
            f"state_dir={work / '.npu-sft'}",
            f"llamafactory.overrides.num_train_epochs={epochs}",
            *overrides,
        ],
    )
    engine = pipeline.settings.engine
    model = ensure_tiny_model(engine, pipeline.state_dir / "models")
    data = prepare_datasets(pipeline.data_settings(), **pipeline.prepare_arguments(tokenizer_file(model)))
    output_dir = work / "output"
    config = resolve_train_config(
        pipeline, model_path=str(model), data_args=data.llamafactory_args(), output_dir=output_dir
    )
    return engine, write_config(config, work / name), output_dir


def run_pipeline_path(
    engine: EngineSettings, config_file: Path, output_dir: Path, work: Path, name: str
) -> tuple[float, float]:
    """Wall time of run_training, and the engine's own training-loop time (train_runtime)."""
    mlflow = MlflowSettings(
        tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        artifact_location=str(work / "mlruns" / "artifacts"),
        experiment="bench-train-overhead",
    )
    tracker = RunTracker.start(mlflow, run_name=name, tags={})
    logger = logging.getLogger(f"bench.{name}")
    logger.propagate = False
    handler = logging.FileHandler(work / f"{name}.task.log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with train_launch(work) as (launch, device_env):
            started = time.monotonic()
            cpu_before = resource.getrusage(resource.RUSAGE_SELF)
            result = run_training(
                engine,
                launch,
                config_file,
                output_dir,
                device_env=device_env,
                log_file=work / f"{name}.train.log",
                on_line=logger.info,
                on_event=logger.warning,
                on_metrics=tracker.log_metrics,
                policy=RetryPolicy(max_attempts=1),
            )
            elapsed = time.monotonic() - started
            cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        logger.removeHandler(handler)
        handler.close()
    # This process's own CPU (streaming, following, MLflow): the overhead figure a busy machine cannot blur.
    own_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    print(f"  orchestrator CPU: {own_cpu_s:.1f} s over {elapsed:.0f} s ({own_cpu_s / elapsed:.1%} of one core)")
    figures, _ = run_figures(result, world_size=2)
    tracker.finish(succeeded=True)
    shown = ", ".join(f"{key.removeprefix('train/')} {value:.4g}" for key, value in figures.items())
    print(f"  pipeline figures: {shown}")
    return elapsed, figures.get("train/loop_time_s", 0.0)


def run_bare(
    engine: EngineSettings, config_file: Path, work: Path, name: str, nproc: int = 2, env: dict[str, str] | None = None
) -> float:
    """Wall time of `FORCE_TORCHRUN=1 NPROC_PER_NODE=nproc llamafactory-cli train CONFIG`, output to a file."""
    command = bare_train_command(
        engine,
        config_file,
        env={
            "FORCE_TORCHRUN": "1",
            "NPROC_PER_NODE": str(nproc),
            "MASTER_PORT": str(unused_port()),
            # llamafactory-cli runs `torchrun` from PATH: the engine env's own.
            "PATH": f"{Path(engine.python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        },
    )
    started = time.monotonic()
    # Deliberately not npu_sft.engine.process: the baseline is the engine alone, its output going straight to a file.
    with (work / f"{name}.log").open("wb") as log:
        completed = subprocess.run(
            command.argv, env={**os.environ, **command.env}, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    elapsed = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"bare llamafactory-cli train failed with exit code {completed.returncode}; see {log.name}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the demo data (51 steps each)")
    parser.add_argument("--pairs", type=int, default=2, help="pipeline/bare pairs, the order alternating")
    parser.add_argument("--target-ratio", type=float, default=1.05)
    parser.add_argument("--engine-python", default=str(REPO / ".npu-sft" / "engine" / "bin" / "python"))
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards; a temporary dir otherwise")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    engine, config_file, output_dir = generate_config(work, args.engine_python, args.epochs)
    print(f"config: {config_file} ({args.epochs} epochs, 2 CPU ranks); logs in {work}")
    # One short, untimed run of each path first: the first run on a machine pays for the file cache, the engine's
    # imports and the MLflow store's creation, and would otherwise land on whichever path the first pair starts.
    _, warm_up_config, _ = generate_config(work, args.engine_python, WARM_UP_EPOCHS, name="warm-up.yaml")
    shutil.rmtree(output_dir, ignore_errors=True)
    run_pipeline_path(engine, warm_up_config, output_dir, work, "warm-up-pipeline")
    shutil.rmtree(output_dir, ignore_errors=True)
    run_bare(engine, warm_up_config, work, "warm-up-bare")
    print("warm-up done (untimed)")

    times: dict[str, list[float]] = {"pipeline": [], "bare": []}
    loop_times: list[float] = []
    for pair in range(args.pairs):
        order = ["pipeline", "bare"] if pair % 2 == 0 else ["bare", "pipeline"]
        for kind in order:
            shutil.rmtree(output_dir, ignore_errors=True)  # every run starts from an empty output dir
            index = len(times[kind])
            if kind == "pipeline":
                elapsed, loop_s = run_pipeline_path(engine, config_file, output_dir, work, f"pipeline-{index}")
                loop_times.append(loop_s)
            else:
                elapsed = run_bare(engine, config_file, work, f"bare-{index}")
            times[kind].append(elapsed)
            print(f"pair {pair + 1}, {kind:8s}: {elapsed:7.1f} s")

    pipeline_s, bare_s = statistics.mean(times["pipeline"]), statistics.mean(times["bare"])
    ratio = pipeline_s / bare_s
    print(f"pipeline (run_training + MLflow + follower): {pipeline_s:.1f} s mean of {times['pipeline']}")
    print(f"bare llamafactory-cli train:                 {bare_s:.1f} s mean of {times['bare']}")
    print(f"overhead ratio: {ratio:.3f} (target <= {args.target_ratio})")
    if min(loop_times) < MIN_TRAINING_S:
        print(f"warning: a training loop took {min(loop_times):.0f} s, under {MIN_TRAINING_S:.0f} s; raise --epochs")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= args.target_ratio else 1


if __name__ == "__main__":
    sys.exit(main())

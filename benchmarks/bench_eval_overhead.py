"""Benchmark the eval stage's overhead: the pipeline's predict (lease, torchrun, streamed log, scores read back)
against a bare `llamafactory-cli train` of the same predict YAML.

    python benchmarks/bench_eval_overhead.py [--pairs 2] [--val-size 0.5] [--max-new-tokens 64] [--target-ratio 1.05]

Set-up (untimed): the demo pipeline's data with a larger held-out split, and a short training that leaves an
adapter. Then both paths run the SAME predict YAML (`do_predict`, the adapter, the held-out split, greedy) with one
CPU rank:

- pipeline: a device lease for the eval task, then `npu_sft.evaluation.EnginePredictor` exactly as the evaluate task
  calls it (torchrun, output streamed into a logger and the stage's log file, predict_results.json read back);
- bare: `FORCE_TORCHRUN=1 NPROC_PER_NODE=1 llamafactory-cli train PREDICT_YAML`, output to a file.

One untimed warm-up run of each, then the order alternates. Prints each run's wall time, the means and their ratio;
exits 1 when the ratio is above the target.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_train_overhead import REPO, generate_config, train_launch
from bench_train_overhead import run_bare as run_bare_train

from npu_sft.devices import DeviceSettings, lease_devices
from npu_sft.engine import EngineSettings
from npu_sft.evaluation import EnginePredictor, EvalSettings, predict_config
from npu_sft.training import RetryPolicy, launch_env, launch_on, run_training


def train_adapter(engine: EngineSettings, config_file: Path, output_dir: Path, work: Path) -> None:
    with train_launch(work) as (launch, device_env):
        run_training(
            engine,
            launch,
            config_file,
            output_dir,
            device_env=device_env,
            log_file=work / "train.log",
            on_line=lambda _: None,
            on_event=print,
            on_metrics=lambda _: None,
            policy=RetryPolicy(max_attempts=1),
        )


def run_pipeline_path(engine: EngineSettings, config: dict, work: Path, name: str) -> float:
    logger = logging.getLogger(f"bench.{name}")
    logger.propagate = False
    handler = logging.FileHandler(work / f"{name}.task.log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    output_dir = work / name
    devices = DeviceSettings(kind="cpu", cpu_virtual_devices=2, eval=1, state_dir=work / "leases")
    started = time.monotonic()
    try:
        with lease_devices(devices, task="eval", on_wait=logger.info) as lease:
            predictor = EnginePredictor(
                engine,
                launch_on(lease),
                device_env={**lease.env(), **launch_env(lease.kind)},
                log_file=work / f"{name}.eval.log",
                on_line=logger.info,
            )
            scores = predictor({**config, "output_dir": str(output_dir)}, output_dir, f"bench {name}")
    finally:
        logger.removeHandler(handler)
        handler.close()
    elapsed = time.monotonic() - started
    rows = sum(1 for line in scores.predictions.open(encoding="utf-8") if line.strip())
    print(f"  {name}: {rows} rows, ROUGE-L {scores.metrics['rouge_l']:.2f}, engine predict_runtime {scores.runtime_s:.1f} s")
    return elapsed


def run_bare(engine: EngineSettings, config: dict, work: Path, name: str) -> float:
    config_file = work / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output_dir": str(work / name)}, sort_keys=False), encoding="utf-8")
    return run_bare_train(engine, config_file, work, name, nproc=1, env={"ACCELERATE_TORCH_DEVICE": "cpu"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="pipeline/bare pairs, the order alternating")
    parser.add_argument("--val-size", type=float, default=0.5, help="share of the demo rows held out and predicted")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--target-ratio", type=float, default=1.05)
    parser.add_argument("--engine-python", default=str(REPO / ".npu-sft" / "engine" / "bin" / "python"))
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards; a temporary dir otherwise")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    engine, train_config, adapter_dir = generate_config(
        work, args.engine_python, 2, overrides=[f"llamafactory.overrides.val_size={args.val_size}"]
    )
    shutil.rmtree(adapter_dir, ignore_errors=True)
    train_adapter(engine, train_config, adapter_dir, work)
    run_config = yaml.safe_load(train_config.read_text(encoding="utf-8"))
    config = predict_config(
        run_config, EvalSettings(max_new_tokens=args.max_new_tokens), output_dir=work / "unused", adapter_dir=adapter_dir
    )
    print(f"adapter trained in {adapter_dir}; predict of {args.val_size:g} of the demo rows, logs in {work}")
    run_pipeline_path(engine, config, work, "warm-up-pipeline")
    run_bare(engine, config, work, "warm-up-bare")
    print("warm-up done (untimed)")

    times: dict[str, list[float]] = {"pipeline": [], "bare": []}
    for pair in range(args.pairs):
        order = ["pipeline", "bare"] if pair % 2 == 0 else ["bare", "pipeline"]
        for kind in order:
            name = f"{kind}-{len(times[kind])}"
            run = run_pipeline_path if kind == "pipeline" else run_bare
            elapsed = run(engine, config, work, name)
            times[kind].append(elapsed)
            print(f"pair {pair + 1}, {kind:8s}: {elapsed:7.1f} s")

    pipeline_s, bare_s = statistics.mean(times["pipeline"]), statistics.mean(times["bare"])
    ratio = pipeline_s / bare_s
    print(f"pipeline (lease + EnginePredictor + scores): {pipeline_s:.1f} s mean of {times['pipeline']}")
    print(f"bare llamafactory-cli train (predict YAML):  {bare_s:.1f} s mean of {times['bare']}")
    print(f"overhead ratio: {ratio:.3f} (target <= {args.target_ratio})")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= args.target_ratio else 1


if __name__ == "__main__":
    sys.exit(main())

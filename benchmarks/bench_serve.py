"""Benchmark the served endpoint with the official `openai` client: the pipeline's API server against a bare
`llamafactory-cli api` with the same model, adapter and settings.

    python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--rounds 4] [--raised 4] [--target-ratio 1.05]

Set-up (untimed): the demo's tiny model and a short training that leaves an adapter. For each concurrency setting
(`serve.max_concurrent` 1, LLaMA-Factory's default, then `--raised`) both servers are started side by side on
loopback:

- pipeline: a device lease for the serve task, then `npu_sft.serving.api_server` exactly as the serve flow calls it
  (the engine command, the process group, the readiness check, the log file);
- bare: `llamafactory-cli api` with the same arguments and environment (API key, MAX_CONCURRENT, API_VERBOSE=0),
  output to a file.

Each round sends `--requests` chat completions from `--clients` threads (greedy, `serve.do_sample: false`, so both
servers generate the same tokens), the servers alternating round by round after one untimed warm-up round each. Prints p50/p95 latency and
requests per second per server and setting, and exits 1 when the pipeline's throughput at the default setting is
more than the target ratio below the bare server's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import yaml
from bench_eval_overhead import train_adapter
from bench_train_overhead import REPO, generate_config

from npu_sft.devices import DeviceSettings, lease_devices
from npu_sft.engine import EngineSettings, ServedModel, api_server_command
from npu_sft.engine.process import start_background
from npu_sft.ports import unused_port
from npu_sft.serving import ServerSpec, api_server, wait_until_ready
from npu_sft.settings import ServeSettings

MODEL_NAME = "bench-adapter:v1"
PROMPTS = ["Who are you?", "What is 12 + 7?", "Reverse the word 'ascend'.", "Who made you?"]


@dataclass(frozen=True)
class Round:
    latencies_s: list[float]
    wall_s: float

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def send_round(base_url: str, api_key: str, requests: int, clients: int, max_tokens: int) -> Round:
    """`requests` chat completions from `clients` threads; any error or empty reply ends the benchmark."""
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)

    def ask(index: int) -> float:
        started = time.monotonic()
        reply = api.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            max_tokens=max_tokens,
        )
        if not (reply.choices[0].message.content or "").strip():
            raise RuntimeError(f"empty reply to {PROMPTS[index % len(PROMPTS)]!r}")
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(ask, range(requests)))
    return Round(latencies, time.monotonic() - started)


@contextmanager
def pipeline_server(
    engine: EngineSettings, model: ServedModel, work: Path, max_concurrent: int, api_key: str
) -> Iterator[str]:
    devices = DeviceSettings(kind="cpu", cpu_virtual_devices=2, serve=1, state_dir=work / "leases")
    with lease_devices(devices, task="serve") as lease:
        spec = ServerSpec(
            engine, ServeSettings(max_concurrent=max_concurrent), model, lease.env(), unused_port(),
            work / f"pipeline-{max_concurrent}.serve.log",
        )
        with api_server(spec, api_key) as running:
            yield running.base_url


@contextmanager
def bare_server(
    engine: EngineSettings, model: ServedModel, work: Path, max_concurrent: int, api_key: str
) -> Iterator[str]:
    port = unused_port()
    # The same arguments and environment, run as a user would: `llamafactory-cli api`, no wrapper, output to a file.
    same = api_server_command(engine, model, ServeSettings(max_concurrent=max_concurrent), port=port, api_key=api_key)
    argv = [str(Path(engine.python).parent / "llamafactory-cli"), *same.argv[same.argv.index("api"):]]
    base_url = f"http://127.0.0.1:{port}"
    with start_background(argv, env=same.env, log_file=work / f"bare-{max_concurrent}.serve.log") as server:
        wait_until_ready(server, base_url, api_key, timeout_s=300)
        yield base_url


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(
    engine: EngineSettings, model: ServedModel, work: Path, max_concurrent: int, args: argparse.Namespace
) -> dict[str, list[Round]]:
    api_key = secrets.token_urlsafe(24)
    rounds: dict[str, list[Round]] = {"pipeline": [], "bare": []}

    def send(url: str) -> Round:
        return send_round(url, api_key, args.requests, args.clients, args.max_tokens)

    with pipeline_server(engine, model, work, max_concurrent, api_key) as ours, \
            bare_server(engine, model, work, max_concurrent, api_key) as bare:
        urls = {"pipeline": ours, "bare": bare}
        for kind in urls:
            send(urls[kind])  # warm-up, untimed
        for index in range(args.rounds):
            order = ["pipeline", "bare"] if index % 2 == 0 else ["bare", "pipeline"]
            for kind in order:
                result = send(urls[kind])
                rounds[kind].append(result)
                print(f"  max_concurrent {max_concurrent}, round {index + 1}, {kind:8s}: "
                      f"{result.requests_per_s:6.2f} req/s, p50 {percentile(result.latencies_s, 0.5):.3f} s")
    return rounds


def summary(rounds: list[Round]) -> tuple[float, float, float]:
    latencies = [latency for one in rounds for latency in one.latencies_s]
    return percentile(latencies, 0.5), percentile(latencies, 0.95), statistics.mean(r.requests_per_s for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="chat completions per round")
    parser.add_argument("--clients", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per server and setting")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--raised", type=int, default=4, help="the raised serve.max_concurrent to compare")
    parser.add_argument("--target-ratio", type=float, default=1.05)
    parser.add_argument("--engine-python", default=str(REPO / ".npu-sft" / "engine" / "bin" / "python"))
    parser.add_argument("--work-dir", type=Path, default=None, help="kept afterwards; a temporary dir otherwise")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    engine, train_config, adapter_dir = generate_config(work, args.engine_python, 2)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    train_adapter(engine, train_config, adapter_dir, work)
    run_config = yaml.safe_load(train_config.read_text(encoding="utf-8"))
    model = ServedModel(MODEL_NAME, run_config["model_name_or_path"], str(adapter_dir), run_config["template"])
    print(f"adapter trained in {adapter_dir}; {args.requests} requests x {args.rounds} rounds, {args.clients} clients, "
          f"logs in {work}")

    results = {setting: measure(engine, model, work, setting, args) for setting in (1, args.raised)}
    print(f"\n{'server':10s} {'max_concurrent':>14s} {'p50 s':>8s} {'p95 s':>8s} {'req/s':>8s}")
    for setting, rounds in results.items():
        for kind in ("pipeline", "bare"):
            p50, p95, rps = summary(rounds[kind])
            print(f"{kind:10s} {setting:14d} {p50:8.3f} {p95:8.3f} {rps:8.2f}")
    ratio = summary(results[1]["bare"])[2] / summary(results[1]["pipeline"])[2]
    print(f"throughput ratio bare / pipeline at max_concurrent 1: {ratio:.3f} (target <= {args.target_ratio})")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= args.target_ratio else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())

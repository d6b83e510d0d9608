"""A process that takes device leases, for the cross-process tests. Run with the orchestrator's python.

lease_worker.py cycle --settings JSON --attempts N --log FILE --seed S
    takes N leases one after another (random task sizes and hold times) and logs, per lease, the
    monotonic time right after it was acquired and right before it is released (the true hold interval
    contains the logged one, so logged overlaps can only understate, never invent, a double hold).
lease_worker.py hold --settings JSON --task T
    takes one lease, prints it as a JSON line, and sleeps until killed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from npu_sft.devices import DeviceSettings, lease_devices


def cycle(settings: DeviceSettings, attempts: int, log_path: str, seed: int, max_hold_s: float) -> None:
    rng = random.Random(seed)
    with open(log_path, "a", encoding="utf-8") as log:
        for attempt in range(attempts):
            count = rng.randint(1, 3)
            sized = settings.model_copy(update={"train": count})
            with lease_devices(sized, task="train", flow_run_id=f"w{seed}-{attempt}", poll_interval_s=0.01) as lease:
                acquired = time.monotonic_ns()
                time.sleep(rng.uniform(0.001, max_hold_s))
                released = time.monotonic_ns()
                log.write(
                    json.dumps(
                        {"ids": list(lease.ids), "port": lease.master_port, "acquired": acquired, "released": released}
                    )
                    + "\n"
                )
                log.flush()


def hold(settings: DeviceSettings, task: str) -> None:
    with lease_devices(settings, task=task, flow_run_id="holder") as lease:
        print(json.dumps({"ids": list(lease.ids), "port": lease.master_port, "lease_id": lease.lease_id}), flush=True)
        while True:
            time.sleep(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["cycle", "hold"])
    parser.add_argument("--settings", required=True, help="DeviceSettings as JSON")
    parser.add_argument("--attempts", type=int, default=25)
    parser.add_argument("--log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-hold-s", type=float, default=0.02)
    parser.add_argument("--task", default="train")
    args = parser.parse_args()
    settings = DeviceSettings.model_validate_json(args.settings)
    if args.mode == "cycle":
        cycle(settings, args.attempts, args.log, args.seed, args.max_hold_s)
    else:
        hold(settings, args.task)


if __name__ == "__main__":
    sys.exit(main())

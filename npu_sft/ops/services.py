"""`make up` / `make down`: the project's services on 127.0.0.1, each started at most once, and the deployments.

    scripts/up      python -m npu_sft.ops.services up
    scripts/down    python -m npu_sft.ops.services down

Services (state under .npu-sft/services/: <name>.json pid record, <name>.log output):
    prefect-server  Prefect API and UI on NPU_SFT_PREFECT_PORT (4200); database in .npu-sft/services/prefect/
    worker          Prefect process worker for the `device-hosts` pool (runs flow runs from the project directory)
    mlflow          MLflow server (UI) on NPU_SFT_MLFLOW_PORT (5000) over the project's store (mlruns/)
    reconciler      marks crashed flow runs and their MLflow runs (npu_sft.ops.reconcile)

Every process a service starts inherits NPU_SFT_SERVICES=<token>/<service>, so `down` also stops what left the
service's process group: Prefect starts each flow run in its own session, torchrun each rank in its own.
Settings are environment variables (ServiceSettings.from_env; the table is in deployments/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from npu_sft import host_processes
from npu_sft.ops.deploy import deploy, write_cli_access
from npu_sft.ops.errors import ServiceError
from npu_sft.ops.settings import ServiceSettings
from npu_sft.ops.specs import service_specs
from npu_sft.ops.supervisor import (
    MARKER_VAR,
    ServiceRecord,
    check_same_port,
    exclusive,
    running_record,
    services_token,
    start,
    stop,
    wait_ready,
)

START_ORDER = ("prefect-server", "mlflow", "worker", "reconciler")
# The worker goes first so its flow runs end (and report Crashed) while the server can still record it.
STOP_ORDER = ("worker", "reconciler", "mlflow", "prefect-server")


def up(settings: ServiceSettings) -> None:
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    token = services_token(settings)
    specs = service_specs(settings, token)
    write_cli_access(settings)
    status: dict[str, str] = {}
    records: dict[str, ServiceRecord] = {}

    def ensure(name: str) -> None:
        spec = specs[name]
        record = running_record(settings, name)
        if record is not None:
            check_same_port(spec, record)
            status[name] = "already running"
        else:
            record = start(settings, spec)
            status[name] = "started"
        records[name] = record

    # MLflow starts beside the Prefect server; both take several seconds and neither needs the other.
    ensure("prefect-server")
    ensure("mlflow")
    wait_ready(settings, specs["prefect-server"], records["prefect-server"])
    deployed = deploy(settings, token)
    ensure("worker")
    ensure("reconciler")
    for name in ("mlflow", "worker", "reconciler"):
        wait_ready(settings, specs[name], records[name])

    print(f"npu-sft services for {settings.project}:")
    for name in START_ORDER:
        print(f"  {name:<15} {status[name]:<16} pid {records[name].pid:<8} {specs[name].describe}")
    print(f"  deployments     {', '.join(deployed)}")
    print("Point the Prefect CLI at this server (or: source .npu-sft/services/env):")
    print(f"  export PREFECT_API_URL={settings.api_url}")
    print("then, for example:")
    print(f"  {settings.bin_dir / 'prefect'} deployment run sft/tiny --watch")


def down(settings: ServiceSettings) -> None:
    if not (settings.services_dir / "token").is_file():
        print("npu-sft services: nothing to stop (never started here)")
        return
    token = services_token(settings)
    for name in STOP_ORDER:
        print(stop(settings, name, token))
    leftovers = [
        info.identity
        for info in host_processes.list_processes([MARKER_VAR])
        if info.env.get(MARKER_VAR, "").startswith(f"{token}/")
    ]
    if leftovers:
        host_processes.terminate(leftovers, settings.stop_grace_s)
        print(f"stopped {len(leftovers)} leftover processes")
    (settings.services_dir / "env").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu_sft.ops.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        settings = ServiceSettings.from_env(Path.cwd(), os.environ)
        with exclusive(settings):
            if args.action == "up":
                up(settings)
            else:
                down(settings)
    except ServiceError as err:
        print(f"npu-sft {args.action}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

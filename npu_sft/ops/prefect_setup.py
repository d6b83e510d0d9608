"""Prefect objects the deployments need besides themselves: the process work pool and the crash automations.

    python -m npu_sft.ops.prefect_setup --pool device-hosts --automations deployments/automations.yaml

Both steps are idempotent: the pool is created only when missing (an existing pool keeps its settings), and
automations are matched by name, so running `make up` again updates them instead of adding copies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound


def load_automations(path: Path) -> list[AutomationCore]:
    """The `automations:` list of a YAML file, validated by Prefect's own schema."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("automations"), list):
        raise ValueError(f"{path}: expected a mapping with an `automations:` list")
    return [AutomationCore.model_validate(item) for item in document["automations"]]


def ensure_work_pool(client: SyncPrefectClient, name: str, pool_type: str = "process") -> bool:
    """Create the pool with its type's default job template unless it exists. Returns whether it was created."""
    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
        return True
    return False


def apply_automations(client: SyncPrefectClient, automations: list[AutomationCore]) -> list[str]:
    """Create each automation, or update the one of the same name. Returns what was done, one line each."""
    done: list[str] = []
    for automation in automations:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
            done.append(f"updated automation {automation.name!r}")
        else:
            client.create_automation(automation)
            done.append(f"created automation {automation.name!r}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npu_sft.ops.prefect_setup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="process work pool to create if missing")
    parser.add_argument("--automations", type=Path, help="YAML file with an `automations:` list")
    args = parser.parse_args(argv)
    automations = load_automations(args.automations) if args.automations else []  # bad YAML fails before any change
    with get_client(sync_client=True) as client:
        created = ensure_work_pool(client, args.pool)
        print(f"{'created' if created else 'found'} work pool {args.pool!r}")
        for line in apply_automations(client, automations):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

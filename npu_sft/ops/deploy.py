"""The Prefect side of `make up`: the CLI pointed at our server, the work pool, the automations and the deployments."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from npu_sft.ops.errors import ServiceError
from npu_sft.ops.settings import ServiceSettings
from npu_sft.ops.specs import WORK_POOL, base_env
from npu_sft.ops.supervisor import MARKER_VAR

DEPLOYMENTS_FILE = Path("deployments/prefect.yaml")
AUTOMATIONS_FILE = Path("deployments/automations.yaml")


def write_cli_access(settings: ServiceSettings) -> Path:
    """A Prefect profile in the services' PREFECT_HOME and a shell snippet, both pointing the CLI at our server."""
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    (settings.prefect_home / "profiles.toml").write_text(
        f'active = "npu-sft"\n\n[profiles.npu-sft]\nPREFECT_API_URL = "{settings.api_url}"\n', encoding="utf-8"
    )
    env_file = settings.services_dir / "env"
    env_file.write_text(f"export PREFECT_API_URL={settings.api_url}\n", encoding="utf-8")
    return env_file


def _run_cli(settings: ServiceSettings, argv: Sequence[str], what: str, token: str) -> str:
    env = base_env(settings, token, "cli")
    env.pop(MARKER_VAR)  # a one-off command, not a service: `down` must not look for it
    completed = subprocess.run(
        list(argv), cwd=settings.project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip().splitlines()
        raise ServiceError(f"{what} failed (exit {completed.returncode}):\n" + "\n".join(output[-30:]))
    return completed.stdout


def deploy(settings: ServiceSettings, token: str) -> list[str]:
    """Create the work pool and the automations if missing, then `prefect deploy --all`, non-interactively."""
    _run_cli(
        settings,
        [str(settings.bin_dir / "python"), "-m", "npu_sft.ops.prefect_setup",
         "--pool", WORK_POOL, "--automations", str(AUTOMATIONS_FILE)],
        "work pool and automations set-up",
        token,
    )
    _run_cli(
        settings,
        [str(settings.bin_dir / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(DEPLOYMENTS_FILE)],
        f"prefect deploy --all --prefect-file {DEPLOYMENTS_FILE}",
        token,
    )
    return deployment_names(settings.project / DEPLOYMENTS_FILE)


def deployment_names(deployments_file: Path) -> list[str]:
    """`flow/deployment` for every deployment in the file (the flow name is the entrypoint function's flow name)."""
    document = yaml.safe_load(deployments_file.read_text(encoding="utf-8"))
    names: list[str] = []
    for deployment in document.get("deployments", []):
        flow_function = str(deployment["entrypoint"]).rsplit(":", 1)[-1]
        names.append(f"{flow_function}/{deployment['name']}")
    return names

"""Which engine env `scripts/setup-envs` builds on this host, and why, in one line.

    python3 -m npu_sft.host_setup        # prints the choice on stderr; `container=...` / `extra=...` on stdout

- `NPU_SFT_ENGINE_CONTAINER=NAME`: the engine is that container (the Ascend LLaMA-Factory image carries torch-npu and
  CANN); no local engine env is built.
- An Ascend host (`npu-smi` on PATH, or a CANN install under `NPU_SFT_ASCEND_ROOT`, default /usr/local/Ascend): the
  locked engine env with pyproject.toml's `engine-npu` group installed over it (torch-npu, and the torch it is built
  for), checked against each other and against the installed CANN before anything is downloaded.
- A GPU host (`nvidia-smi`): the locked env; its torch is PyPI's CUDA build.
- Otherwise the locked env on the CPU.

Run by setup-envs with any Python >= 3.11 before the orchestrator env exists, so it imports the standard library
and `npu_sft.errors` only.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from npu_sft.errors import BadInputError

CONTAINER_VAR = "NPU_SFT_ENGINE_CONTAINER"
ASCEND_ROOT_VAR = "NPU_SFT_ASCEND_ROOT"  # CANN's --install-path when it is not the default
DEFAULT_ASCEND_ROOT = "/usr/local/Ascend"
COMPATIBILITY_URL = "https://gitcode.com/Ascend/pytorch (its version table)"
# The CANN each torch-npu release was built for (Ascend's compatibility table for the Ascend Extension for PyTorch).
# A release missing here is newer than the table: it needs at least the newest CANN listed.
TORCH_NPU_CANN = {
    "2.12.0": "9.1.0",
    "2.11.0": "9.1.0",
    "2.10.0.post4": "9.1.0",
    "2.10.0": "9.0.0",
    "2.9.0.post2": "9.0.0",
    "2.9.0": "8.5.0",
    "2.8.0.post4": "9.0.0",
    "2.8.0.post2": "8.5.0",
    "2.8.0": "8.3.RC1",
    "2.7.1": "8.3.RC1",
    "2.6.0": "8.2.RC1",
    "2.5.1": "8.1.RC1",
    "2.1.0.post3": "8.0.RC1",
}


class HostSetupError(BadInputError):
    """This host cannot get a working engine env as configured; the message says what to change."""


@dataclass(frozen=True)
class EnginePlan:
    host: str  # ascend | gpu | cpu
    said: str  # what was seen and what is chosen, one line
    extra: tuple[str, ...] = ()  # pip requirements on top of requirements/engine.lock
    container: str | None = None  # the engine is this container; no local env


def cann_version(root: Path) -> tuple[str, Path] | None:
    """The installed CANN toolkit's version and its install-info file, in the layouts CANN has used: ascend-toolkit/
    latest (up to 8.3), cann and cann-<version> (8.5 on)."""
    arch = f"{platform.machine()}-linux"
    candidates = [root / "ascend-toolkit" / "latest" / arch, root / "cann" / arch]
    candidates += sorted(root.glob(f"cann-*/{arch}"), reverse=True)
    for directory in candidates:
        info = directory / "ascend_toolkit_install.info"
        if info.is_file():
            for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "version" and value.strip():
                    return value.strip(), info
    return None


def cann_order(version: str) -> tuple[int, int, int, int]:
    """8.0.RC1 < 8.0.RC2 < 8.0.0 < 8.3.RC1 < 8.5.0 < 9.1.0 (an RC comes before its release)."""
    match = re.match(r"(\d+)\.(\d+)\.(?:RC(\d+)|(\d+))", version, re.IGNORECASE)
    if match is None:
        raise HostSetupError(f"cannot read the CANN version {version!r}")
    major, minor, rc, patch = match.groups()
    return (int(major), int(minor), 0, int(rc)) if rc is not None else (int(major), int(minor), 1, int(patch))


def needed_cann(torch_npu: str) -> tuple[str, bool]:
    """The CANN a torch-npu release needs, and whether the table knows the release (else: the newest CANN listed)."""
    if torch_npu in TORCH_NPU_CANN:
        return TORCH_NPU_CANN[torch_npu], True
    return max(TORCH_NPU_CANN.values(), key=cann_order), False


def locked_version(lock: Path, package: str) -> str:
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise HostSetupError(f"{lock} pins no {package}")


def npu_group(pyproject: Path) -> dict[str, str]:
    """pyproject.toml's `engine-npu` dependency group: package name -> pinned version."""
    group = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("dependency-groups", {}).get("engine-npu", [])
    pins = {}
    for requirement in group:
        name, _, version = requirement.partition("==")
        if not version:
            raise HostSetupError(f"{pyproject}: dependency-groups.engine-npu: pin {requirement!r} as NAME==VERSION")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    if "torch-npu" not in pins:
        raise HostSetupError(f"{pyproject}: dependency-groups.engine-npu pins no torch-npu==VERSION")
    return pins


def torch_for(torch_npu: str) -> str:
    """The torch a torch-npu release is built for: its version without the .postN (its wheel requires torch==X.Y.Z.*)."""
    return ".".join(torch_npu.split(".")[:3])


def ascend_plan(root: Path, npu_smi: str | None, lock: Path, pyproject: Path) -> EnginePlan:
    seen = f"npu-smi at {npu_smi}" if npu_smi else f"{root} without npu-smi on PATH"
    found = cann_version(root)
    if found is None:
        raise HostSetupError(
            f"Ascend host ({seen}) but no CANN toolkit under {root}: install CANN's toolkit and kernels (or set "
            f"{ASCEND_ROOT_VAR} to its install path), or use the Ascend LLaMA-Factory container: {CONTAINER_VAR}=NAME"
        )
    cann, info = found
    pins = npu_group(pyproject)
    torch_npu = pins["torch-npu"]
    torch = pins.get("torch") or locked_version(lock, "torch")
    torch_from = f"{pyproject.name}'s engine-npu group" if "torch" in pins else lock.name
    if torch_for(torch_npu) != torch.split("+")[0]:
        raise HostSetupError(
            f"torch-npu {torch_npu} is built for torch {torch_for(torch_npu)}, the Ascend engine env would get torch "
            f"{torch} ({torch_from}): pin torch=={torch_for(torch_npu)} (and its torchvision) in {pyproject.name}'s "
            "engine-npu group, or the torch-npu release for that torch"
        )
    needed, known = needed_cann(torch_npu)
    if cann_order(cann) < cann_order(needed):
        raise HostSetupError(
            f"CANN {cann} ({info}) is older than torch-npu {torch_npu} needs (CANN {needed} or newer"
            f"{'' if known else f', as torch-npu releases older than {torch_npu} already do'}): upgrade CANN, or "
            f"use the Ascend LLaMA-Factory container: {CONTAINER_VAR}=NAME; see {COMPATIBILITY_URL}"
        )
    unknown = "" if known else f" (torch-npu {torch_npu} is newer than this check's table: see {COMPATIBILITY_URL})"
    return EnginePlan(
        "ascend",
        f"Ascend host ({seen}, CANN {cann}): engine env with torch {torch} and torch-npu {torch_npu}{unknown}",
        extra=tuple(f"{name}=={version}" for name, version in pins.items()),
    )


def plan_engine(env: Mapping[str, str], lock: Path, pyproject: Path) -> EnginePlan:
    container = env.get(CONTAINER_VAR, "").strip()
    if container:
        return EnginePlan(
            "container",
            f"engine: the container {container!r} ({CONTAINER_VAR}), no local engine env; give the pipeline config "
            f"engine: {{python: python, command_prefix: [docker, exec, -i, {container}]}}",
            container=container,
        )
    path = env.get("PATH", "")
    npu_smi = shutil.which("npu-smi", path=path)
    root = Path(env.get(ASCEND_ROOT_VAR) or DEFAULT_ASCEND_ROOT)
    if npu_smi or (root / "ascend-toolkit").is_dir() or any(root.glob("cann*")):
        return ascend_plan(root, npu_smi, lock, pyproject)
    torch = locked_version(lock, "torch")
    nvidia_smi = shutil.which("nvidia-smi", path=path)
    if nvidia_smi:
        return EnginePlan("gpu", f"GPU host (nvidia-smi at {nvidia_smi}): engine env with torch {torch} (CUDA build)")
    return EnginePlan("cpu", f"CPU host (no npu-smi, nvidia-smi or {root}): engine env with torch {torch} on the CPU")


def main() -> int:
    repo = Path(__file__).resolve().parents[1]
    try:
        plan = plan_engine(os.environ, repo / "requirements" / "engine.lock", repo / "pyproject.toml")
    except HostSetupError as err:
        print(f"setup-envs: error: {err}", file=sys.stderr)
        return 2
    print(plan.said, file=sys.stderr)
    if plan.container:
        print(f"container={plan.container}")
    for requirement in plan.extra:
        print(f"extra={requirement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

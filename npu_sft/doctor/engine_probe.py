"""torch in the engine env, on the cards a config would lease: torch_npu importable (CANN loaded for it), the cards
available to it, a small matmul on each. What Ascend users otherwise find minutes into a training: CANN not sourced,
torch_npu missing so LLaMA-Factory runs on the CPU (LLaMA-Factory #4159, #6461), kernels missing (#3779, #4610)."""

from __future__ import annotations

from typing import Any

from npu_sft.devices import Lease
from npu_sft.devices.models import VISIBLE_DEVICES_VAR, DeviceKind
from npu_sft.doctor.devices import UNSUPPORTED_CHIPS
from npu_sft.doctor.errors import CardsNotWorking
from npu_sft.doctor.models import Finding, ok
from npu_sft.engine import EngineSettings, engine_script_command, process

PROBE_SCRIPT = "probe_devices.py"
NO_KERNEL = "does not has any binary"  # CANN's words when an operator has no kernel for this chip


def probe_engine(engine: EngineSettings, kind: DeviceKind, ids: tuple[int, ...]) -> list[Finding]:
    variable = VISIBLE_DEVICES_VAR.get(kind)
    env = {variable: ",".join(map(str, ids))} if variable is not None else {}
    if (missing := engine.missing_python()) is not None:
        return [Finding("engine", "error", missing, "set engine.python in the config, or run `make setup`")]
    command = engine_script_command(engine, PROBE_SCRIPT, [kind], env=env)
    try:
        completed = process.run_streaming(command.argv, env=command.env, stdin_file=command.stdin_file)
    except OSError as err:  # the engine's program (its python, docker, ssh) is not there
        return [Finding("engine", "error", f"cannot start {command.argv[0]}: {err.strerror}",
                        "check engine.python and engine.command_prefix in the config")]
    found = process.last_json_line(completed.tail)
    if not completed.ok or found is None:
        last = " / ".join(completed.tail[-3:]) or "no output"
        return [Finding("engine", "error", f"the engine's python did not run the probe (exit {completed.returncode}): "
                        f"{last}", "check engine.python (and engine.command_prefix) in the config")]
    return read_probe(found, kind, ids)


def require_working_cards(engine: EngineSettings, lease: Lease) -> None:
    """The doctor's device check on a training's lease, before its first attempt: a broken card, CANN not loaded or
    torch-npu missing stop the run in seconds instead of minutes into (or days on the CPU through) a training. The
    CPU always computes, so a CPU lease is not probed."""
    if lease.kind == "cpu":
        return
    errors = [finding for finding in probe_engine(engine, lease.kind, lease.ids) if finding.status == "error"]
    if errors:
        raise CardsNotWorking(
            f"the {lease.kind} lease ({','.join(map(str, lease.ids))}) cannot train: "
            + "; ".join(f"{finding.check}: {finding.detail} (fix: {finding.fix})" for finding in errors)
        )


def read_probe(found: dict[str, Any], kind: DeviceKind, ids: tuple[int, ...]) -> list[Finding]:
    error = found.get("error")
    if error is not None:
        return [Finding("engine", "error", error, _import_fix(error))]
    versions = f"torch {found['torch']}" + (f", torch_npu {found['torch_npu']}" if "torch_npu" in found else "")
    if kind == "cpu":
        return [ok("engine", f"{versions}: a small matmul on the CPU")]
    if not found.get("available"):
        return [Finding("engine", "error", f"{versions}: no {kind} available to torch (it would run on the CPU)",
                        "`npu-smi info` must list the cards; in a container, pass it the /dev/davinci* devices")]
    if found.get("count", 0) < len(ids):
        return [Finding("engine", "error", f"{versions} sees {found.get('count')} {kind}, the lease gives {len(ids)}",
                        f"check {VISIBLE_DEVICES_VAR.get(kind, 'the visible devices')} and the container's devices")]
    findings = []
    for card in found.get("cards", []):
        device_id = ids[card["index"]] if card["index"] < len(ids) else card["index"]
        name = card.get("name", "")
        unsupported = next((reason for chip, reason in UNSUPPORTED_CHIPS.items() if chip in name), None)
        if unsupported is not None:
            findings.append(Finding(f"{kind.upper()} {device_id}", "error", f"{name}: {unsupported}", "lease other cards"))
            continue
        if card.get("ok"):
            continue
        message = card.get("error", "")
        fix = (
            "CANN's kernels for this chip are missing or do not match the toolkit: install the Ascend-cann-kernels "
            "package of the toolkit's version"
            if NO_KERNEL in message
            else "`npu-smi info -t health -i N` and the driver's log say more; lease other cards meanwhile"
        )
        findings.append(Finding(f"{kind.upper()} {device_id}", "error", f"a small matmul failed: {message}", fix))
    if not findings:
        findings.append(ok("engine", f"{versions}: a small matmul on each card ({kind} {','.join(map(str, ids))})"))
    return findings


def _import_fix(error: str) -> str:
    if "No module named" in error:
        return "the engine env has no torch-npu: scripts/setup-envs on this host installs it, or use the Ascend container"
    if "cannot open shared object" in error or "lib" in error:
        return "CANN's libraries are not loaded for the engine: set engine.env_script to CANN's set_env.sh"
    return "run the engine's python by hand with this import to see the whole error"

"""What an Ascend host needs besides its cards: CANN where the engine finds it, and HCCL's timeout no shorter than
the training's own collective timeout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from npu_sft.doctor.models import Finding, ok
from npu_sft.engine import EngineSettings
from npu_sft.host_setup import ASCEND_ROOT_VAR, CONTAINER_VAR, DEFAULT_ASCEND_ROOT, cann_version

HCCL_EXEC_TIMEOUT_VAR = "HCCL_EXEC_TIMEOUT"
HCCL_EXEC_TIMEOUT_DEFAULT_S = 1800  # HCCL's default when the variable is unset
DDP_TIMEOUT_DEFAULT_S = 1800  # transformers' TrainingArguments.ddp_timeout


def check_cann(engine: EngineSettings, environ: Mapping[str, str], config_file: Path) -> list[Finding]:
    if engine.command_prefix:
        return [Finding("CANN", "warning", f"the engine runs behind {' '.join(engine.command_prefix)}: its CANN is "
                        "not visible from this host", "check it inside: `llamafactory-cli env` shows the CANN version")]
    root = Path(environ.get(ASCEND_ROOT_VAR) or DEFAULT_ASCEND_ROOT)
    found = cann_version(root)
    if found is None:
        findings = [Finding(
            "CANN", "error", f"no CANN toolkit under {root}",
            f"install CANN's toolkit and 910B kernels there (or set {ASCEND_ROOT_VAR}), or run the engine in the "
            f"Ascend LLaMA-Factory container ({config_file}: engine.command_prefix; setup-envs: {CONTAINER_VAR})",
        )]
    else:
        version, info = found
        findings = [ok("CANN", f"{version} ({info})")]
    script = engine.env_script
    if script is None:
        findings.append(Finding(
            "engine.env_script", "warning", "not set: the engine sees CANN only if the worker's environment has it",
            f"{config_file}: engine.env_script: {root}/ascend-toolkit/set_env.sh (or CANN's own set_env.sh)",
        ))
    elif not Path(script).is_file():
        findings.append(Finding("engine.env_script", "error", f"{script} does not exist",
                                f"{config_file}: engine.env_script: the set_env.sh of the CANN above"))
    return findings


def check_hccl(
    llamafactory: Mapping[str, object], llamafactory_file: Path, engine: EngineSettings, environ: Mapping[str, str]
) -> list[Finding]:
    """LLaMA-Factory's recipes raise ddp_timeout (the seed: 180000000 s) so that ranks wait while rank 0 tokenizes;
    HCCL gives up on a collective after HCCL_EXEC_TIMEOUT anyway, and the wait ends in a 507046 stream-sync timeout
    (LLaMA-Factory #5551)."""
    ddp = float(llamafactory.get("ddp_timeout", DDP_TIMEOUT_DEFAULT_S))  # type: ignore[arg-type]
    raw = engine.env.get(HCCL_EXEC_TIMEOUT_VAR) or environ.get(HCCL_EXEC_TIMEOUT_VAR)
    where = "engine.env" if HCCL_EXEC_TIMEOUT_VAR in engine.env else "the environment"
    if raw is None:
        hccl, said = HCCL_EXEC_TIMEOUT_DEFAULT_S, f"{HCCL_EXEC_TIMEOUT_VAR} unset ({HCCL_EXEC_TIMEOUT_DEFAULT_S} s)"
    elif raw.strip().isdigit():
        hccl, said = int(raw), f"{HCCL_EXEC_TIMEOUT_VAR}={raw} s ({where})"
    else:
        return [Finding("HCCL timeout", "error", f"{HCCL_EXEC_TIMEOUT_VAR}={raw!r} in {where} is not whole seconds",
                        f"set {HCCL_EXEC_TIMEOUT_VAR} to a number of seconds")]
    if ddp > hccl:
        return [Finding(
            "HCCL timeout", "warning",
            f"ddp_timeout {ddp:.0f} s ({llamafactory_file.name}) but {said}: a rank waiting longer than {hccl} s in a "
            "collective (rank 0 still tokenizing) fails with a 507046 stream-sync timeout",
            f"set {HCCL_EXEC_TIMEOUT_VAR} in the config's engine.env to the longest wait, or tokenize once beforehand "
            "(LLaMA-Factory's tokenized_path)",
        )]
    return [ok("HCCL timeout", f"{said} covers ddp_timeout {ddp:.0f} s")]

"""What a failed training attempt was, read from the tail of its output and its exit code.

    failure = classify_failure(completed.tail, completed.returncode)
    if failure.retryable: ...   # the retry loop is npu_sft.training.attempts
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class FailureKind(str, Enum):
    OUT_OF_MEMORY = "out_of_memory"
    CONFIG_ERROR = "config_error"
    DEVICE_BUSY = "device_busy"
    CRASHED = "crashed"
    STALLED = "stalled"  # no progress within the phase's deadline: stopped by the watchdog (npu_sft.training.stall)
    DIVERGED = "diverged"  # NaN, infinite or zero loss, step after step: stopped by a guard (npu_sft.training.guards)
    WRONG_DEVICE = "wrong_device"  # a rank on the CPU under an NPU or GPU lease: stopped by a guard
    COLLECTIVE_TIMEOUT = "collective_timeout"  # ranks gave up waiting for each other (HCCL_EXEC_TIMEOUT, NCCL)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    evidence: str  # the output line (or exit status) the verdict rests on
    returncode: int

    @property
    def retryable(self) -> bool:
        # The same config and the same memory budget fail the same way again; a crash or a busy card may not.
        return self.kind in (FailureKind.CRASHED, FailureKind.DEVICE_BUSY, FailureKind.STALLED)

    def describe(self) -> str:
        """What happened and whether a retry may help: "crashed, retryable: rank 1 (pid 645) was killed by SIGKILL"."""
        verdict = "retryable" if self.retryable else "not retryable"
        return f"{self.what}, {verdict}: {self.evidence}"

    @property
    def what(self) -> str:
        return {
            FailureKind.OUT_OF_MEMORY: "ran out of device memory",
            FailureKind.CONFIG_ERROR: "was refused by LLaMA-Factory (configuration error)",
            FailureKind.DEVICE_BUSY: "found the cards still held by a previous training process (HCCL)",
            FailureKind.CRASHED: "crashed",
            FailureKind.STALLED: "stalled and was stopped",
            FailureKind.DIVERGED: "diverged and was stopped",
            FailureKind.WRONG_DEVICE: "ran on the wrong device and was stopped",
            FailureKind.COLLECTIVE_TIMEOUT: "timed out with ranks waiting for each other in a collective",
        }[self.kind]

    @property
    def fix(self) -> str:
        """What to change before running again, where the output alone says it; empty otherwise."""
        if self.kind is FailureKind.COLLECTIVE_TIMEOUT:
            return (
                "a rank waited longer than HCCL_EXEC_TIMEOUT (default 1800 s; NCCL: ddp_timeout), usually while rank 0 "
                "tokenized: set engine.env.HCCL_EXEC_TIMEOUT and ddp_timeout to the longest wait, or tokenize once "
                "beforehand (LLaMA-Factory's tokenized_path); `npu-sft doctor CONFIG` compares the two"
            )
        return ""


# torchrun (since torch 2.2) prefixes each rank's traceback lines with "[rankN]: "; a tqdm frame without a newline
# can stand before it on the same line.
_RANK_PREFIX = re.compile(r"\[(?:default)?rank\d+\]:\s?")

_OUT_OF_MEMORY = [
    re.compile(r"\b(?:CUDA|NPU|XPU|MPS|HIP) out of memory", re.IGNORECASE),  # torch / torch_npu allocators
    re.compile(r"\bOutOfMemoryError\b"),  # torch.OutOfMemoryError, torch.cuda.OutOfMemoryError
    re.compile(r"RuntimeError: \[ERROR\].*\bmemory\b", re.IGNORECASE),  # torch_npu's "[ERROR] ... memory" form
    re.compile(r"\bEL0004\b|Failed to allocate memory", re.IGNORECASE),  # CANN runtime allocation failure
    re.compile(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)"),  # host memory
]
# HCCL cannot open a card a previous process still holds; its own advice is to wait and retry.
_DEVICE_BUSY = [re.compile(r"Maybe the last training process is running"), re.compile(r"\bEJ0001\b")]
# Ranks that waited for the others longer than the collective timeout (LLaMA-Factory #5551, Ascend/pytorch #62:
# ranks 1.. in `main_process_first` while rank 0 tokenizes). The same wait comes back on a retry: the seed's
# overwrite_cache: true tokenizes again.
_COLLECTIVE_TIMEOUT = [
    re.compile(r"error code is 507046\b"),  # torch_npu: aclrtSynchronizeDevice, "stream sync timeout"
    re.compile(r"\bEE1002\b.*Stream synchronize timeout"),
    re.compile(r"\bEI0002\b.*Notify register times out"),  # HCCL: the remote rank never arrived
    re.compile(r"Watchdog caught collective operation timeout"),  # NCCL's watchdog (ddp_timeout)
]
_CONFIG_MESSAGES = [
    re.compile(r"Some keys are not used by the HfArgumentParser"),
    re.compile(r"is not a local folder and is not a valid model identifier"),
    re.compile(r"does not appear to have (?:a )?files? named"),
]
# A ValueError raised while these modules set the run up (arguments, datasets, template, model, LoRA adapter) is the
# configuration being refused, e.g. peft's "Target modules {...} not found in the base model": it fails every time.
_CONFIG_FRAMES = re.compile(
    r"llamafactory/hparams/|llamafactory/data/(?:parser|template|loader)\.py|llamafactory/model/(?:adapter|loader)\.py"
    r"|transformers/(?:hf_argparser|training_args)\.py"
)
_TRACEBACK_START = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")
# torchrun's summary: "exitcode  : -9 (pid: 645)  (SIGKILL)" under "Root Cause (first observed failure):".
_ROOT_CAUSE_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid: (\d+)\)(?:\s*\((SIG\w+)\))?")
_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")


@dataclass(frozen=True)
class _RaisedException:
    line: str  # "ValueError: ..." without the rank prefix
    frames: tuple[str, ...]  # file paths of the traceback, outermost first


def _raised_exceptions(tail: Sequence[str]) -> list[_RaisedException]:
    """Each traceback in the output, with the file of every frame. Ranks interleave their output, so frames are
    collected per rank prefix."""
    frames_by_prefix: dict[str, list[str]] = {}
    found: list[_RaisedException] = []
    for raw in tail:
        match = _RANK_PREFIX.search(raw)
        prefix = match.group(0).strip() if match else ""
        line = raw[match.end() :] if match else raw
        if _TRACEBACK_START in line:
            frames_by_prefix[prefix] = []
            continue
        frames = frames_by_prefix.get(prefix)
        if frames is None:
            continue
        frame = _FRAME.match(line)
        if frame:
            frames.append(frame.group(1))
            continue
        if _EXCEPTION.match(line):
            found.append(_RaisedException(line.strip(), tuple(frames)))
            del frames_by_prefix[prefix]
    return found


def _first_match(tail: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> str | None:
    """The first line matching any pattern, without its rank prefix. An exception line ("ValueError: ...") wins over
    a traceback's source line that quotes the same words (`raise ValueError(f"Some keys ...")`)."""
    matches = []
    for line in tail:
        if any(pattern.search(line) for pattern in patterns):
            prefix = _RANK_PREFIX.search(line)
            matches.append((line[prefix.end() :] if prefix else line).strip())
    return next((line for line in matches if _EXCEPTION.match(line)), matches[0] if matches else None)


def _config_error(tail: Sequence[str]) -> str | None:
    message = _first_match(tail, _CONFIG_MESSAGES)
    if message is not None:
        return message
    for raised in _raised_exceptions(tail):
        if raised.line.startswith("ValueError:") and any(_CONFIG_FRAMES.search(path) for path in raised.frames):
            return raised.line
    return None


def _crash_evidence(tail: Sequence[str], returncode: int) -> str:
    """The root cause torchrun reports ("rank 1 exited with -9 (SIGKILL)"), else the last exception, else the code."""
    rank: str | None = None
    in_root_cause = False
    for line in tail:
        if line.startswith("Root Cause"):
            in_root_cause = True
        elif in_root_cause and (rank_match := _ROOT_CAUSE_RANK.match(line)):
            rank = rank_match.group(1)
        elif in_root_cause and (exit_match := _ROOT_CAUSE_EXIT.search(line)):
            code, pid, signal_name = exit_match.groups()
            how = f"was killed by {signal_name}" if signal_name else f"exited with code {code}"
            return f"rank {rank if rank is not None else '?'} (pid {pid}) {how}"
    raised = _raised_exceptions(tail)
    if raised:
        return raised[-1].line
    if returncode < 0:
        return f"the launcher was killed by signal {-returncode}"
    return f"exit code {returncode}"


def classify_failure(tail: Sequence[str], returncode: int) -> Failure:
    """Why a training attempt failed, from the last lines of its output and its exit code.

    Out of memory and configuration errors come first: they fail again the same way however often they are retried,
    even when a later, secondary error (a torn-down process group) is also in the output.
    """
    if returncode == 0:
        raise ValueError("classify_failure() needs a failed attempt; this one exited with code 0")
    oom = _first_match(tail, _OUT_OF_MEMORY)
    if oom is not None:
        return Failure(FailureKind.OUT_OF_MEMORY, oom, returncode)
    config = _config_error(tail)
    if config is not None:
        return Failure(FailureKind.CONFIG_ERROR, config, returncode)
    busy = _first_match(tail, _DEVICE_BUSY)
    if busy is not None:
        return Failure(FailureKind.DEVICE_BUSY, busy, returncode)
    timeout = _first_match(tail, _COLLECTIVE_TIMEOUT)
    if timeout is not None:
        return Failure(FailureKind.COLLECTIVE_TIMEOUT, timeout, returncode)
    return Failure(FailureKind.CRASHED, _crash_evidence(tail, returncode), returncode)

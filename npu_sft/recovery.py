"""What to do after a training attempt fails: classify the failure, wait for the cards, pick the checkpoint to resume.

Pure or injectable functions only; the retry loop itself lives in `npu_sft.training`.

    failure = classify_failure(completed.tail, completed.returncode)
    if failure.retryable:
        wait_for_idle_devices(lease.ids, processes_on_devices, settle_s=10, ...)   # NPU leases
        point = find_resume_point(output_dir)                                     # newest COMPLETE checkpoint
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from npu_sft.devices import DeviceProcess
from npu_sft.errors import NpuSftError

# --------------------------------------------------------------------------------------------------------------------
# Failure classification
# --------------------------------------------------------------------------------------------------------------------


class FailureKind(str, Enum):
    OUT_OF_MEMORY = "out_of_memory"
    CONFIG_ERROR = "config_error"
    DEVICE_BUSY = "device_busy"
    CRASHED = "crashed"
    STALLED = "stalled"  # no progress within the phase's deadline: stopped by the watchdog (npu_sft.stall)


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
        }[self.kind]


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
    return Failure(FailureKind.CRASHED, _crash_evidence(tail, returncode), returncode)


# --------------------------------------------------------------------------------------------------------------------
# Waiting for the cards
# --------------------------------------------------------------------------------------------------------------------

DeviceProbe = Callable[[Sequence[int]], Mapping[int, Sequence[DeviceProcess]]]


class DevicesStillBusy(NpuSftError, RuntimeError):
    """The previous training's processes did not leave the cards in time."""


def wait_for_idle_devices(
    ids: Sequence[int],
    probe: DeviceProbe,
    *,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    on_wait: Callable[[str], None],
) -> None:
    """Return once `probe` (npu-smi's process table) lists no process on any of `ids`; DevicesStillBusy after
    `timeout_s`. Only waits: the processes may belong to someone else, so they are never killed from here."""
    deadline = clock() + timeout_s
    while True:
        busy = {device_id: procs for device_id, procs in probe(ids).items() if procs}
        if not busy:
            return
        holders = "; ".join(
            f"{device_id}: pid {', '.join(str(proc.pid) for proc in procs)}"
            for device_id, procs in sorted(busy.items())
        )
        if clock() >= deadline:
            raise DevicesStillBusy(
                f"cards still run processes after {timeout_s:.0f} s ({holders}); stop them (npu-smi info lists them) "
                "and run the pipeline again"
            )
        on_wait(f"waiting for the previous training processes to leave the cards ({holders})")
        sleep(poll_s)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_PREFIX = "incomplete-"  # not matched by the trainer's `checkpoint-*` rotation nor by CHECKPOINT_NAME
ADAPTER_WEIGHTS = "adapter_model.safetensors"
JSON_FILES = ("adapter_config.json", "trainer_state.json")
SCHEDULER = "scheduler.pt"
OPTIMIZER = "optimizer.pt"
DEEPSPEED_LATEST = "latest"  # DeepSpeed keeps its optimizer shards in the directory this file names


@dataclass(frozen=True)
class CheckpointCheck:
    path: Path
    step: int
    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: CheckpointCheck | None  # None: no complete checkpoint, start from the beginning
    skipped: tuple[CheckpointCheck, ...] = field(default_factory=tuple)  # newer ones that are incomplete

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def safetensors_problem(path: Path) -> str | None:
    """Whether the header parses and the tensor data it describes is all there (a truncated file is not)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) < 8:
            return f"{path.name} is shorter than a safetensors header"
        header_len = int.from_bytes(length_bytes, "little")
        if header_len > size - 8:
            return f"{path.name}: header of {header_len} bytes runs past the end of the {size}-byte file"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return f"{path.name}: safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return f"{path.name}: safetensors header is not a JSON object"
    data_len = size - 8 - header_len
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]
        ):
            return f"{path.name}: tensor {key!r} has no valid data_offsets in the header"
        ends.append(offsets[1])
    if max(ends, default=0) != data_len:
        return f"{path.name}: tensors need {max(ends, default=0)} bytes of data, the file holds {data_len}"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return f"{path.name} is not valid JSON ({err})"
    return None


def torch_archive_problem(path: Path) -> str | None:
    """torch.save writes zip archives: a truncated one has lost its central directory, a corrupt one fails a CRC."""
    if not zipfile.is_zipfile(path):
        return f"{path.name} is not a complete zip archive (torch.save format)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        return f"{path.name} cannot be read as a zip archive ({err})"
    if bad_member is not None:
        return f"{path.name}: member {bad_member} fails its CRC check"
    return None


def _optimizer_problems(checkpoint: Path) -> list[str]:
    if (checkpoint / OPTIMIZER).is_file():
        return [p for p in [torch_archive_problem(checkpoint / OPTIMIZER)] if p]
    latest = checkpoint / DEEPSPEED_LATEST
    if not latest.is_file():
        return [f"no {OPTIMIZER} (nor a DeepSpeed `{DEEPSPEED_LATEST}` file)"]
    tag = latest.read_text(encoding="utf-8").strip()
    shard_dir = checkpoint / tag
    shards = sorted(shard_dir.glob("*.pt")) if tag and shard_dir.is_dir() else []
    if not any(shard.name.endswith("optim_states.pt") for shard in shards):
        return [f"DeepSpeed `{DEEPSPEED_LATEST}` names {tag!r}, which holds no optimizer states"]
    return [problem for shard in shards if (problem := torch_archive_problem(shard))]


def inspect_checkpoint(path: Path) -> CheckpointCheck:
    """Every file a LLaMA-Factory LoRA checkpoint needs to resume, present and loadable (without torch)."""
    match = CHECKPOINT_NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-N directory")
    step = int(match.group(1))
    problems: list[str] = []
    required = [ADAPTER_WEIGHTS, *JSON_FILES, SCHEDULER]
    missing = [name for name in required if not (path / name).is_file()]
    problems += [f"{name} missing" for name in missing]
    if ADAPTER_WEIGHTS not in missing and (problem := safetensors_problem(path / ADAPTER_WEIGHTS)):
        problems.append(problem)
    for name in JSON_FILES:
        if name not in missing and (problem := json_problem(path / name)):
            problems.append(problem)
    if SCHEDULER not in missing and (problem := torch_archive_problem(path / SCHEDULER)):
        problems.append(problem)
    problems += _optimizer_problems(path)
    rng_states = sorted(path.glob("rng_state*.pth"))
    if not rng_states:
        problems.append("no rng_state*.pth")
    problems += [problem for rng in rng_states if (problem := torch_archive_problem(rng))]
    if "trainer_state.json" not in missing and not any("trainer_state.json" in p for p in problems):
        global_step = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
        if global_step != step:
            problems.append(f"trainer_state.json says global_step {global_step}, the directory says {step}")
    return CheckpointCheck(path, step, tuple(problems))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def find_resume_point(output_dir: Path) -> ResumePoint:
    """The newest checkpoint that is complete, and the newer ones skipped because they are not."""
    skipped: list[CheckpointCheck] = []
    for path in list_checkpoints(output_dir):
        check = inspect_checkpoint(path)
        if check.complete:
            return ResumePoint(check, tuple(skipped))
        skipped.append(check)
    return ResumePoint(None, tuple(skipped))


def set_aside(check: CheckpointCheck) -> Path:
    """Rename an incomplete checkpoint out of the trainer's way (kept for inspection, never resumed from).

    Otherwise the resumed run would write checkpoint-N into a directory holding stale partial files, and the
    trainer's checkpoint rotation would count it."""
    target = check.path.with_name(f"{INCOMPLETE_PREFIX}{check.path.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = check.path.with_name(f"{INCOMPLETE_PREFIX}{suffix}-{check.path.name}")
    check.path.rename(target)
    return target

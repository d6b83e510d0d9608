"""Which checkpoint a retry resumes from: each checkpoint's files are checked, an incomplete one is set aside.

    point = find_resume_point(output_dir)     # the newest COMPLETE checkpoint, and the newer incomplete ones
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

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

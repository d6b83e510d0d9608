"""Which checkpoint a retry resumes from: the newest one whose files are all there and all load."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest

from npu_sft.training.checkpoints import (
    find_resume_point,
    inspect_checkpoint,
    safetensors_problem,
    set_aside,
    torch_archive_problem,
)


def write_safetensors(path: Path, floats: int = 256) -> None:
    header = json.dumps({"lora_A": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads its header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack(f"<{floats}f", *range(floats)))


def write_torch_archive(path: Path) -> None:
    """torch.save's format: a zip archive holding data.pkl and the tensor storages."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 50)
        archive.writestr("archive/data/0", bytes(range(256)) * 8)


def write_checkpoint(output_dir: Path, step: int, *, ranks: int = 2, deepspeed: bool = False) -> Path:
    """The files LLaMA-Factory (transformers' Trainer) writes for a LoRA checkpoint."""
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    write_safetensors(path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 51, "log_history": []}))
    write_torch_archive(path / "scheduler.pt")
    for rank in range(ranks):
        write_torch_archive(path / f"rng_state_{rank}.pth")
    if deepspeed:
        (path / "latest").write_text(f"global_step{step}")
        (path / f"global_step{step}").mkdir()
        write_torch_archive(path / f"global_step{step}" / "mp_rank_00_model_states.pt")
        for rank in range(ranks):
            write_torch_archive(path / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    else:
        write_torch_archive(path / "optimizer.pt")
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_complete_checkpoint_passes(tmp_path: Path) -> None:
    check = inspect_checkpoint(write_checkpoint(tmp_path, 20))
    assert check.complete and check.step == 20, check.problems


def test_a_complete_deepspeed_checkpoint_passes(tmp_path: Path) -> None:
    check = inspect_checkpoint(write_checkpoint(tmp_path, 10, deepspeed=True))
    assert check.complete, check.problems


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors: tensors need 1024 bytes"),
        (lambda c: truncate(c / "adapter_model.safetensors", 0.02), "adapter_model.safetensors: header of"),
        (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is not a complete zip archive"),
        (lambda c: truncate(c / "rng_state_1.pth", 0.9), "rng_state_1.pth is not a complete zip archive"),
        (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt missing"),
        (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
        (lambda c: [p.unlink() for p in c.glob("rng_state*")], "no rng_state*.pth"),
        (lambda c: (c / "adapter_config.json").write_text('{"r": 1'), "adapter_config.json is not valid JSON"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 10}'), "says global_step 10"),
    ],
)
def test_missing_or_truncated_files_make_a_checkpoint_incomplete(tmp_path: Path, damage, problem: str) -> None:
    checkpoint = write_checkpoint(tmp_path, 20)
    damage(checkpoint)
    check = inspect_checkpoint(checkpoint)
    assert not check.complete
    assert any(problem in p for p in check.problems), check.problems


def test_a_corrupt_zip_member_fails_its_crc(tmp_path: Path) -> None:
    archive = tmp_path / "optimizer.pt"
    write_torch_archive(archive)
    data = bytearray(archive.read_bytes())
    data[data.index(bytes(range(256)))] ^= 0xFF  # flip one byte of the stored tensor data
    archive.write_bytes(bytes(data))
    assert "fails its CRC check" in (torch_archive_problem(archive) or "")


def test_truncated_deepspeed_optimizer_shard_is_caught(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path, 10, deepspeed=True)
    truncate(checkpoint / "global_step10" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not inspect_checkpoint(checkpoint).complete


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step)
    truncate(tmp_path / "checkpoint-30" / "optimizer.pt")
    (tmp_path / "checkpoint-5").mkdir()  # older and empty: never looked at
    point = find_resume_point(tmp_path)
    assert point.checkpoint is not None and point.checkpoint.path.name == "checkpoint-20"
    assert [c.path.name for c in point.skipped] == ["checkpoint-30"]
    assert point.step == 20


def test_no_complete_checkpoint_means_start_over(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    truncate(tmp_path / "checkpoint-10" / "adapter_model.safetensors")
    point = find_resume_point(tmp_path)
    assert point.checkpoint is None and point.step == 0 and len(point.skipped) == 1
    assert find_resume_point(tmp_path / "not-there").checkpoint is None


def test_set_aside_moves_out_of_the_trainers_way(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 30)
    truncate(tmp_path / "checkpoint-30" / "optimizer.pt")
    moved = set_aside(inspect_checkpoint(tmp_path / "checkpoint-30"))
    assert moved.name == "incomplete-checkpoint-30" and moved.is_dir()
    assert not list(tmp_path.glob("checkpoint-*"))  # the trainer's rotation globs checkpoint-*
    write_checkpoint(tmp_path, 30)
    truncate(tmp_path / "checkpoint-30" / "optimizer.pt")
    assert set_aside(inspect_checkpoint(tmp_path / "checkpoint-30")).name == "incomplete-2-checkpoint-30"


def test_safetensors_check_accepts_a_whole_file_and_rejects_a_stub(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_safetensors(path, floats=1000)
    assert safetensors_problem(path) is None
    path.write_bytes(b"\x01\x02")
    assert "shorter than a safetensors header" in (safetensors_problem(path) or "")


def write_header(path: Path, header: object) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 1024)


@pytest.mark.parametrize(
    "header",
    [
        {"lora_A": {"dtype": "F32", "shape": [256]}},  # no data_offsets
        {"lora_A": [0, 1024]},  # an entry that is not an object
        {"lora_A": {"dtype": "F32", "data_offsets": ["0", "1024"]}},
        {"lora_A": {"dtype": "F32", "data_offsets": [512, 0]}},
    ],
)
def test_a_malformed_header_makes_the_checkpoint_incomplete_and_the_previous_one_is_resumed(
    tmp_path: Path, header: object
) -> None:
    write_checkpoint(tmp_path, 10)
    newest = write_checkpoint(tmp_path, 20)
    write_header(newest / "adapter_model.safetensors", header)
    assert "adapter_model.safetensors: tensor 'lora_A' has no valid data_offsets" in (
        safetensors_problem(newest / "adapter_model.safetensors") or ""
    )
    point = find_resume_point(tmp_path)
    assert point.checkpoint is not None and point.checkpoint.step == 10
    assert [check.path.name for check in point.skipped] == ["checkpoint-20"]

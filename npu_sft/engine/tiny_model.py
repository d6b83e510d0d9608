"""The embedded default model: generated once per (corpus, seed, generator) in the engine env, then reused."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from npu_sft.datasets import demo_corpus
from npu_sft.engine import ENGINE_SCRIPTS, EngineSettings, engine_script_command, process

GENERATOR = "make_tiny_model.py"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_model_dir(cache_root: Path, seed: int, corpus: list[str]) -> Path:
    """Named by what determines its bytes, so a changed corpus or generator makes a new model, never a stale one."""
    digest = hashlib.sha256()
    digest.update((ENGINE_SCRIPTS / GENERATOR).read_bytes())
    digest.update(json.dumps(corpus, ensure_ascii=False).encode())
    digest.update(str(seed).encode())
    return cache_root / f"tiny-qwen2-{digest.hexdigest()[:12]}"


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in MODEL_FILES)


def ensure_tiny_model(
    engine: EngineSettings, cache_root: Path, seed: int = 0, on_line: Callable[[str], None] | None = None
) -> Path:
    corpus = demo_corpus()
    model_dir = tiny_model_dir(cache_root, seed, corpus)
    if is_complete(model_dir):
        return model_dir
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=cache_root, encoding="utf-8", delete=False) as handle:
        json.dump(corpus, handle, ensure_ascii=False)
        corpus_file = Path(handle.name)
    try:
        command = engine_script_command(
            engine, GENERATOR, ["--corpus", str(corpus_file), "--out", str(model_dir), "--seed", str(seed)]
        )
        completed = process.run_streaming(command.argv, env=command.env, stdin_file=command.stdin_file, on_line=on_line)
    finally:
        corpus_file.unlink(missing_ok=True)
    if not completed.ok:
        raise process.CommandFailed(completed, "generating the tiny model")
    return model_dir


def tokenizer_file(model_dir: Path) -> Path | None:
    """The model's own fast tokenizer, for token statistics; None when the model ships none."""
    path = model_dir / "tokenizer.json"
    return path if path.is_file() else None

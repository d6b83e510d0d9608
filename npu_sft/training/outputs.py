"""After training: LLaMA-Factory's final metrics, and the adapter copied out for publishing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files LLaMA-Factory writes beside the adapter that a server or a later merge needs too.
ADAPTER_COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "README.md")


def read_results(output_dir: Path) -> dict[str, float]:
    """LLaMA-Factory's final metrics (all_results.json), with perplexity derived from eval_loss."""
    results_file = output_dir / "all_results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file} missing: the engine finished without writing its results")
    results = {key: float(value) for key, value in json.loads(results_file.read_text()).items() if isinstance(value, (int, float))}
    if "eval_loss" in results:
        eval_loss = results["eval_loss"]
        results["perplexity"] = math.exp(eval_loss) if eval_loss < 700 else math.inf
    return results


def evaluation_results(output_dir: Path) -> dict[str, float]:
    """The training's final evaluation (eval_loss, perplexity, eval_runtime, ...): all_results.json without the
    train_* figures, which the train task computes across attempts."""
    return {key: value for key, value in read_results(output_dir).items() if not key.startswith("train_")}


def collect_adapter(output_dir: Path, dest: Path) -> Path:
    """Copy the trained adapter (not the checkpoints) into `dest`, the directory that gets published."""
    missing = [name for name in ADAPTER_FILES if not (output_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{output_dir}: training wrote no {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES + ADAPTER_COMPANIONS:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, dest / name)
    return dest

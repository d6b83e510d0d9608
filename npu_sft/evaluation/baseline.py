"""The base model's scores, computed once per (model, eval split, predict settings, engine env) and then reused.

The store is a directory per key under the project's state dir; a directory holds a finished predict's outputs and
`baseline.json`, the inputs its key was made of, so a reused score can be traced to what produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from npu_sft.download.manifest import RECORD_FILE_NAME
from npu_sft.engine import EngineSettings
from npu_sft.evaluation.errors import EvaluationError
from npu_sft.evaluation.models import Baseline
from npu_sft.evaluation.predict import Predict, eval_split_file, read_scores

BASELINE_RECORD = "baseline.json"
KEY_FORMAT = 1
# The predict config's paths vary between runs without changing what the base model answers; their contents are in
# the key instead (the model's identity, the eval split's hash).
PATH_KEYS = ("output_dir", "model_name_or_path", "dataset_dir", "eval_dataset")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path) -> dict[str, Any]:
    """A hub download's id, commit and file digests (its manifest); otherwise the directory and its files' sizes and
    modification times (a local or generated model: regenerated or edited, it is another model)."""
    record_file = model_dir / RECORD_FILE_NAME
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        return {key: record.get(key) for key in ("model_id", "resolved_revision", "files")}
    files = sorted(path for path in model_dir.iterdir() if path.is_file())
    return {
        "path": str(model_dir.resolve()),
        "files": [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files],
    }


def engine_identity(engine: EngineSettings) -> dict[str, Any]:
    """The engine env: a local env's resolved directory (its name holds the hash of its requirements), or how a
    remote one is reached."""
    identity: dict[str, Any] = {"python": engine.python, "command_prefix": engine.command_prefix}
    if engine.env_script:
        identity["env_script"] = engine.env_script
    if engine.is_local and os.sep in engine.python:
        identity["env_dir"] = str(Path(engine.python).parent.resolve())
    return identity


def baseline_inputs(config: Mapping[str, Any], engine: EngineSettings) -> dict[str, Any]:
    """Everything that decides the base model's answers, as a JSON document."""
    model_dir = Path(str(config["model_name_or_path"]))
    if not model_dir.is_dir():
        raise EvaluationError(f"base model {model_dir} is not a directory")
    return {
        "format": KEY_FORMAT,
        "predict": {key: value for key, value in sorted(config.items()) if key not in PATH_KEYS},
        "model": model_identity(model_dir),
        "eval_split_sha256": file_sha256(eval_split_file(config)),
        "engine": engine_identity(engine),
    }


def baseline_key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:24]


def score_base_model(
    config: Mapping[str, Any],
    engine: EngineSettings,
    store: Path,
    predict: Predict,
    on_event: Callable[[str], None],
) -> Baseline:
    """The base model's scores for the predict `config` (one without an adapter): from the store when an earlier run
    computed them under the same key, otherwise by one predict, then kept in the store."""
    if config.get("adapter_name_or_path"):
        raise ValueError("score_base_model() needs a predict config without adapter_name_or_path")
    inputs = baseline_inputs(config, engine)
    key = baseline_key(inputs)
    kept = store / key
    if (kept / BASELINE_RECORD).is_file():
        try:
            scores = read_scores(kept)
        except EvaluationError as err:
            on_event(f"base model scores in {kept} are unusable, scoring again: {err}")
        else:
            on_event(f"base model scores reused from {kept} (same model, eval split, settings and engine)")
            return Baseline(scores, key, reused=True)
    # Predict into a directory of this process's own, then move it in whole: a run that stops halfway leaves no
    # half-written baseline under the key, and two runs scoring the same key at once do not mix their files.
    work = store / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    predict({**config, "output_dir": str(work)}, work, "scoring the base model (no adapter)")
    (work / BASELINE_RECORD).write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str), encoding="utf-8")
    shutil.rmtree(kept, ignore_errors=True)
    try:
        work.rename(kept)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # another run kept the same key first; its scores are as good
    return Baseline(read_scores(kept), key, reused=False)

"""The eval stage as a plain function: the adapter's predict, the base model's (computed or reused), the result."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from npu_sft.engine import EngineSettings
from npu_sft.evaluation.baseline import score_base_model
from npu_sft.evaluation.models import Evaluation
from npu_sft.evaluation.predict import Predict, predict_config
from npu_sft.evaluation.settings import EvalSettings


def evaluate_adapter(
    run_config: Mapping[str, Any],
    settings: EvalSettings,
    *,
    adapter_dir: Path,
    out_dir: Path,
    predict: Predict,
    engine: EngineSettings,
    baseline_store: Path,
    on_event: Callable[[str], None],
) -> Evaluation:
    """Score `adapter_dir` on the run's held-out split with the run's model and template (`run_config` is the
    training's LLaMA-Factory config), and the base model the same way when `settings.baseline`."""
    started = time.monotonic()
    adapter_out = out_dir / "adapter"
    config = predict_config(run_config, settings, output_dir=adapter_out, adapter_dir=adapter_dir)
    adapter = predict(config, adapter_out, f"scoring the adapter {adapter_dir}")
    baseline = None
    if settings.baseline:
        base_config = predict_config(run_config, settings, output_dir=out_dir / "base", adapter_dir=None)
        baseline = score_base_model(base_config, engine, baseline_store, predict, on_event)
    return Evaluation(adapter=adapter, baseline=baseline, wall_time_s=time.monotonic() - started)

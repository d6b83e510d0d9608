"""The eval stage: LLaMA-Factory's predict for the adapter and the base model, scores under stable names, gains.

evaluation = evaluate_adapter(run_config, settings.eval, adapter_dir=..., out_dir=..., predict=EnginePredictor(...),
                              engine=settings.engine, baseline_store=state_dir / "baselines", on_event=log.info)
record_evaluation(run.tracker, evaluation, sample_rows(evaluation, settings.eval.samples))

Modules: `settings`, `errors`, `models` (scores, baselines, an evaluation), `predict` (LLaMA-Factory's predict and
its scores), `baseline` (the base model scored once per key), `stage` (the eval stage), `samples`, `recording` (what
an evaluation writes into the run). `reevaluation` (`npu-sft evaluate`: the run or registered version to score
again, its training record restored) reads the pipeline's settings, which import this package, so it is not
imported here.
"""

from npu_sft.evaluation.baseline import baseline_inputs, baseline_key, score_base_model
from npu_sft.evaluation.errors import EvaluationError, PredictFailed
from npu_sft.evaluation.models import SCORE_NAMES, Baseline, Evaluation, Scores
from npu_sft.evaluation.predict import EnginePredictor, Predict, predict_config, read_scores
from npu_sft.evaluation.recording import SAMPLES_TABLE, record_evaluation
from npu_sft.evaluation.samples import sample_rows
from npu_sft.evaluation.settings import EvalSettings
from npu_sft.evaluation.stage import evaluate_adapter

__all__ = [
    "SAMPLES_TABLE",
    "SCORE_NAMES",
    "Baseline",
    "EnginePredictor",
    "EvalSettings",
    "Evaluation",
    "EvaluationError",
    "Predict",
    "PredictFailed",
    "Scores",
    "baseline_inputs",
    "baseline_key",
    "evaluate_adapter",
    "predict_config",
    "read_scores",
    "record_evaluation",
    "sample_rows",
    "score_base_model",
]

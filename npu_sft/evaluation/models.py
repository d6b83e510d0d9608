"""What the eval stage returns: scores of one predict, the base model's (computed or reused), and the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# LLaMA-Factory's names in predict_results.json -> the run's names (eval/<name>, base/<name>, gain/<name>).
SCORE_NAMES = {
    "predict_bleu-4": "bleu_4",
    "predict_rouge-1": "rouge_1",
    "predict_rouge-2": "rouge_2",
    "predict_rouge-l": "rouge_l",
}


@dataclass(frozen=True)
class Scores:
    """One predict's scores (0-100, as LLaMA-Factory's metric code reports them) and its outputs."""

    metrics: dict[str, float]  # bleu_4, rouge_1, rouge_2, rouge_l
    runtime_s: float  # the engine's own predict_runtime: generation and scoring, without loading
    predictions: Path  # generated_predictions.jsonl: prompt, predict, label per row
    output_dir: Path


@dataclass(frozen=True)
class Baseline:
    """The base model's scores under the same settings; `reused` when they came from an earlier run's cache."""

    scores: Scores
    key: str
    reused: bool


@dataclass(frozen=True)
class Evaluation:
    """The eval stage's result, which the publish gate reads."""

    adapter: Scores | None  # None: generation scoring is off (eval.enabled: false)
    baseline: Baseline | None
    loss: dict[str, float] = field(default_factory=dict)  # the training's eval_loss and perplexity
    wall_time_s: float = 0.0

    def gains(self) -> dict[str, float]:
        """Adapter minus base model, per score; empty without a baseline."""
        if self.adapter is None or self.baseline is None:
            return {}
        base = self.baseline.scores.metrics
        return {name: value - base[name] for name, value in self.adapter.metrics.items() if name in base}

    def metrics(self) -> dict[str, float]:
        """Everything under the names the run keeps across runs: eval/*, base/*, gain/*, eval_loss, perplexity."""
        metrics = dict(self.loss)
        if self.adapter is None:
            return metrics
        metrics.update({f"eval/{name}": value for name, value in self.adapter.metrics.items()})
        metrics["eval/predict_runtime_s"] = self.adapter.runtime_s
        metrics["eval/wall_time_s"] = self.wall_time_s
        if self.baseline is not None:
            metrics.update({f"base/{name}": value for name, value in self.baseline.scores.metrics.items()})
            metrics["base/predict_runtime_s"] = self.baseline.scores.runtime_s
            metrics.update({f"gain/{name}": value for name, value in self.gains().items()})
        return metrics

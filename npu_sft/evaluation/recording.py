"""The eval stage in the run: stable metric names, where the baseline came from, the predictions, the samples."""

from __future__ import annotations

from npu_sft.evaluation.models import Evaluation
from npu_sft.evaluation.samples import as_columns
from npu_sft.run_recorder import RunRecorder

SAMPLES_TABLE = "eval/samples.json"


def record_evaluation(recorder: RunRecorder, evaluation: Evaluation, samples: list[dict[str, str]]) -> None:
    recorder.log_metrics((key, value, 0) for key, value in evaluation.metrics().items())
    if evaluation.adapter is None:
        return
    recorder.log_artifact(evaluation.adapter.predictions, "eval/adapter")
    tags = {"eval/baseline": "none"}
    if evaluation.baseline is not None:
        baseline = evaluation.baseline
        recorder.log_artifact(baseline.scores.predictions, "eval/base")
        tags = {"eval/baseline": "reused" if baseline.reused else "computed", "eval/baseline_key": baseline.key}
    recorder.set_tags(tags)
    if samples:
        recorder.log_table(as_columns(samples), SAMPLES_TABLE)

"""The pipeline run in MLflow: the store and its client, one run per pipeline run and what the stages record in
it, its description (params, source tags), its summary, the runs it ends from outside, and `npu-sft compare`.

    tracker = RunTracker.start(settings.mlflow, run_name=..., tags=source_tags(origin))
    run = RunContext(tracker, run_dir)

Modules: `client` (tracking URI, one client per store, the experiment), `tracker` (RunTracker), `step_metrics`
(StepMetricSink), `run_ending` (ending a flow run's runs from its hooks and the reconciler), `tags`, `run_context`
(a run's tracker and working directory), `description` (params and source tags), `summary` (the Prefect summary
artifact and MLflow links), `compare` (`npu-sft compare`, imported by path: only that command needs it).
Wings record through the `npu_sft.run_recorder.RunRecorder` protocol, so they do not import this package.
"""

from npu_sft.tracking.client import artifact_location, client_for, tracking_uri
from npu_sft.tracking.run_context import RunContext
from npu_sft.tracking.run_ending import end_running_runs, end_runs_of_flow_run
from npu_sft.tracking.step_metrics import StepMetricSink
from npu_sft.tracking.tags import END_REASON_TAG, EXPERIMENT_KIND_TAG, FLOW_RUN_TAG, MODEL_TRAINING_KIND
from npu_sft.tracking.tracker import RunTracker

__all__ = [
    "END_REASON_TAG",
    "EXPERIMENT_KIND_TAG",
    "FLOW_RUN_TAG",
    "MODEL_TRAINING_KIND",
    "RunContext",
    "RunTracker",
    "StepMetricSink",
    "artifact_location",
    "client_for",
    "end_running_runs",
    "end_runs_of_flow_run",
    "tracking_uri",
]

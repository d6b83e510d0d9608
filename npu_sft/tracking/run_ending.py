"""Ending a flow run's MLflow runs from outside the run: the flow's state hooks and the reconciler."""

from __future__ import annotations

from mlflow import MlflowClient

from npu_sft.settings import MlflowSettings
from npu_sft.tracking.client import client_for
from npu_sft.tracking.tags import END_REASON_TAG, FLOW_RUN_TAG


def end_running_runs(
    client: MlflowClient, experiment_ids: list[str], flow_run_id: str, status: str, reason: str | None, reason_tag: str
) -> list[str]:
    """End the flow run's MLflow runs in `experiment_ids` that are still RUNNING with `status` (FINISHED, FAILED or
    KILLED), `reason` in `reason_tag`; returns their ids. A run some earlier hand already ended is left as it is."""
    if not experiment_ids:
        return []
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.{FLOW_RUN_TAG} = '{flow_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        if reason:
            client.set_tag(run.info.run_id, reason_tag, reason[:5000])
        client.set_terminated(run.info.run_id, status=status)
    return [run.info.run_id for run in runs]


def end_runs_of_flow_run(settings: MlflowSettings, flow_run_id: str, status: str, reason: str | None) -> list[str]:
    """`end_running_runs` in the pipeline's experiment, the reason in `npu_sft.end_reason`."""
    client = client_for(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_ids = [experiment.experiment_id] if experiment is not None else []
    return end_running_runs(client, experiment_ids, flow_run_id, status, reason, END_REASON_TAG)

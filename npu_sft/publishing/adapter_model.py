"""The run's adapter as an MLflow 3 logged model: its files, the facts a team needs to trust it (base model and its
resolved revision, chat template, dataset content key), and the run's evaluation metrics linked to it, so MLflow's
Models tab lists each adapter with its scores. The registry's versions are made from it (`npu_sft.publishing.versions`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException

from npu_sft.download import ModelSource, is_commit_id
from npu_sft.publishing.errors import PublishError
from npu_sft.settings import ConfigError, TinyModelSource
from npu_sft.tracking import RunTracker

LOGGED_MODEL_NAME = "adapter"
MODEL_TYPE = "peft-lora"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # MLflow's own link from a logged model to its registered versions
BASE_MODEL_TAG = "base_model"
BASE_REVISION_TAG = "base_model.revision"


@dataclass(frozen=True)
class AdapterFacts:
    """What the adapter was trained from: on the logged model and on every version made from it."""

    base_model: str  # ModelScope id, a local model's label, or `tiny (seed N)`
    base_revision: str  # the commit the download resolved; empty for a local or generated model
    template: str  # LLaMA-Factory's chat template, which serving must use too
    dataset_key: str  # content key of the prepared data (inputs' digests and preparation settings)

    def tags(self) -> dict[str, str]:
        return {
            BASE_MODEL_TAG: self.base_model,
            BASE_REVISION_TAG: self.base_revision,
            "template": self.template,
            "dataset.key": self.dataset_key,
        }

    def description(self, run_id: str) -> str:
        revision = f" at revision {self.base_revision}" if self.base_revision else ""
        return (
            f"LoRA adapter for {self.base_model}{revision}, LLaMA-Factory template `{self.template}`, trained by "
            f"MLflow run {run_id} on prepared data {self.dataset_key}. Serve it with that base model and template."
        )


def adapter_facts(
    model: ModelSource | TinyModelSource, run_tags: Mapping[str, str], engine_config: Mapping[str, Any]
) -> AdapterFacts:
    """The facts from the pipeline's model source, the tags the earlier stages left on the run (`model.*`,
    `data.key`) and the engine config the training ran with."""
    revision = ""
    if isinstance(model, ModelSource) and model.source == "modelscope":
        revision = run_tags.get("model.resolved_revision", "")
    return AdapterFacts(
        base_model_label(model), revision, str(engine_config.get("template", "")), run_tags.get("data.key", "")
    )


def base_model_label(model: ModelSource | TinyModelSource) -> str:
    if isinstance(model, TinyModelSource):
        return f"tiny (seed {model.seed})"
    return model.id or str(model.path)


def base_model_for(
    model: ModelSource | TinyModelSource, version_tags: Mapping[str, str], version_uri: str
) -> ModelSource | TinyModelSource:
    """The config's model as the base of a registered version: refused in one line when it is not the model the
    version was trained on; a ModelScope branch or tag is pinned to the commit the version was trained on, so a
    branch that moved since does not change the weights under the adapter."""
    recorded = version_tags.get(BASE_MODEL_TAG, "")
    ours = base_model_label(model)
    if recorded and recorded != ours:
        raise ConfigError(
            f"model: {version_uri} was trained on {recorded}, the config's model is {ours}; use the config it was "
            "trained with"
        )
    revision = version_tags.get(BASE_REVISION_TAG, "")
    if not isinstance(model, ModelSource) or model.source != "modelscope" or not is_commit_id(revision):
        return model
    if is_commit_id(model.revision) and model.revision != revision:
        raise ConfigError(
            f"model.revision: {version_uri} was trained on {recorded} at {revision}, the config pins {model.revision}"
        )
    return model.model_copy(update={"revision": revision})


def log_adapter_model(
    tracker: RunTracker, adapter_dir: Path, facts: AdapterFacts, metrics: Mapping[str, float]
) -> str:
    """The adapter's files as a logged model of the run (once per run), READY only once every file is up (a failed
    upload leaves it FAILED, and nothing registers a FAILED model); `metrics`, already logged to the run, linked to
    it. Returns the model id."""
    client = tracker.client
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    earlier = logged_adapter_of(tracker, experiment_id)
    if earlier is not None:
        return earlier  # a retried task: the run's adapter is up already
    model = client.create_logged_model(
        experiment_id,
        name=LOGGED_MODEL_NAME,
        source_run_id=tracker.run_id,
        tags=facts.tags(),
        model_type=MODEL_TYPE,
    )
    try:
        client.log_model_artifacts(model.model_id, str(adapter_dir))
        _link_metrics(tracker, model.model_id, metrics)
    except (OSError, MlflowException) as err:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise PublishError(
            f"could not upload the adapter in {adapter_dir} to MLflow ({err}); nothing was registered"
        ) from err
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def logged_adapter_of(tracker: RunTracker, experiment_id: str) -> str | None:
    """The id of the run's READY adapter model, if it logged one."""
    models = tracker.client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{tracker.run_id}' AND name = '{LOGGED_MODEL_NAME}'"
    )
    ready = [model for model in models if model.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


def _link_metrics(tracker: RunTracker, model_id: str, metrics: Mapping[str, float]) -> None:
    """Each metric's latest point again, with the same timestamp and step and the model id: MLflow keeps it once in
    the run's history and adds it to the model's metrics."""
    linked = []
    for key in metrics:
        history = tracker.client.get_metric_history(tracker.run_id, key)
        if history:
            point = history[-1]
            linked.append(Metric(key, point.value, point.timestamp, point.step, model_id=model_id))
    if linked:
        tracker.client.log_batch(tracker.run_id, metrics=linked)


def note_version(tracker: RunTracker, model_id: str, name: str, version: str) -> None:
    """MLflow's link from the logged model to the registered version made from it, as `mlflow.register_model`
    writes it (the Models tab shows it)."""
    model = tracker.client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]")) + [{"name": name, "version": version}]
    tracker.client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})

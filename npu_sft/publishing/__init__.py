"""Publishing a trained adapter: an MLflow logged model, a registered version, `candidate` at once and `champion`
when the gate says so; a champion pushed to ModelScope or merged into its base model.

    model_id = log_adapter_model(tracker, adapter_dir, facts, metrics)
    published = publish_version(tracker, settings.publish.registered_model, model_id, facts, settings.publish.gate,
                                metrics, lock_file)

Modules: `settings` (the `publish:` block), `errors`, `gate` (the pure decision), `adapter_model` (the logged
model and what the adapter was trained from), `versions` (a registered version and its aliases), `registry`
(finding a registered version's run and files), `modelscope_push` (a champion to a ModelScope repository),
`merged_export` (a champion merged into its base model). Those last five read the pipeline's settings or its MLflow
store, and the pipeline's settings import this package, so they are not imported here.
"""

from npu_sft.publishing.errors import PublishError, PushError, RegistryError
from npu_sft.publishing.gate import Champion, GateDecision, decide, describe_gate
from npu_sft.publishing.settings import GateSettings, MergedExportSettings, ModelScopePushSettings, PublishSettings

__all__ = [
    "Champion",
    "GateDecision",
    "GateSettings",
    "MergedExportSettings",
    "ModelScopePushSettings",
    "PublishError",
    "PublishSettings",
    "PushError",
    "RegistryError",
    "decide",
    "describe_gate",
]

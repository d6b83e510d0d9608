"""Publishing a run's adapter: a version of the registered model made from the run's logged adapter model
(`npu_sft.publishing.adapter_model`), `candidate` at once, `champion` when the gate says so. The gate's verdict and its numbers
go to the version's tags and the run's."""

from __future__ import annotations

import fcntl
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from npu_sft.publishing.adapter_model import AdapterFacts, note_version
from npu_sft.publishing.gate import Champion, GateDecision, decide
from npu_sft.publishing.registry import CHAMPION, name_filter
from npu_sft.publishing.settings import GateSettings
from npu_sft.tracking import RunTracker

CANDIDATE = "candidate"
MODEL_ID_TAG = "model_id"  # the logged model a version was made from
REGISTERED_MODEL_DESCRIPTION = (
    "LoRA adapters trained by npu-sft. `@champion` passed the publish gate; `@candidate` is the latest version. "
    "Each version's tags name its base model, template and data."
)


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    decision: GateDecision
    champion: str | None  # the champion version once this publish is done
    new_version: bool  # False: the run had been published before, and that version was used


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One publisher at a time decides about `champion` (on this host's state dir): two runs judged against the same
    old champion would otherwise both be promoted, the later one silently replacing the better one."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def current_champion(tracker: RunTracker, name: str, metric: str) -> Champion | None:
    client = tracker.client
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None
    run_id = client.get_model_version(name, str(version)).run_id
    score = client.get_run(run_id).data.metrics.get(f"eval/{metric}") if run_id else None
    return Champion(str(version), score if score is not None and math.isfinite(score) else None)


def publish_version(
    tracker: RunTracker,
    name: str,
    model_id: str,
    facts: AdapterFacts,
    gate: GateSettings,
    metrics: Mapping[str, float],
    lock_file: Path,
) -> Published:
    """Register the run's logged adapter model `model_id` as a version of `name` (once per run), alias it
    `candidate`, and make it `champion` if it passes `gate` against its `metrics` and the current champion."""
    client = tracker.client
    earlier = [v for v in client.search_model_versions(name_filter(name)) if v.run_id == tracker.run_id]
    if earlier:
        version, new_version = str(min(int(v.version) for v in earlier)), False
    else:
        version, new_version = register_version(tracker, name, model_id, facts), True
    client.set_registered_model_alias(name, CANDIDATE, version)
    with _exclusive(lock_file):
        champion = current_champion(tracker, name, gate.metric)
        if champion is not None and champion.version == version:
            decision = GateDecision(True, f"version {version} is already the champion")
        else:
            decision = decide(gate, metrics, champion)
            if decision.promote:
                client.set_registered_model_alias(name, CHAMPION, version)
                champion = Champion(version, metrics.get(f"eval/{gate.metric}"))
    verdict = "champion" if decision.promote else "candidate"
    client.set_model_version_tag(name, version, "gate.verdict", verdict)
    client.set_model_version_tag(name, version, "gate.reason", decision.reason[:5000])
    tracker.set_tags(
        {"publish/version": version, "publish/gate_verdict": verdict, "publish/gate_reason": decision.reason[:5000]}
    )
    return Published(name, version, decision, champion.version if champion else None, new_version)


def register_version(tracker: RunTracker, name: str, model_id: str, facts: AdapterFacts) -> str:
    """A new version of `name` holding the logged model's files, with its facts as tags and a description."""
    client = tracker.client
    try:
        client.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # The model's own location, not `models:/<id>`: MLflow resolves that one against the process-wide tracking
    # URI, which an in-process SQLite store does not set.
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(
        name,
        source=source,
        run_id=tracker.run_id,
        tags={**facts.tags(), MODEL_ID_TAG: model_id},
        description=facts.description(tracker.run_id),
        model_id=model_id,
    )
    note_version(tracker, model_id, name, str(version.version))
    return str(version.version)

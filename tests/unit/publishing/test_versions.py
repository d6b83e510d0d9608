from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow.entities import LoggedModelStatus

from npu_sft.publishing import versions
from npu_sft.publishing.adapter_model import MODEL_VERSIONS_TAG, AdapterFacts, log_adapter_model
from npu_sft.publishing.errors import PublishError, RegistryError
from npu_sft.publishing.settings import GateSettings
from npu_sft.publishing.versions import CANDIDATE, CHAMPION, MODEL_ID_TAG, publish_version
from npu_sft.settings import MlflowSettings
from npu_sft.tracking import RunTracker

MODEL = "adapters"


@pytest.fixture
def store(tmp_path: Path) -> MlflowSettings:
    return MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        experiment="publish",
    )


FACTS = AdapterFacts("qwen/Qwen1.5-7B", "2f6b3c1e", "qwen", "data-0123")


def trained_run(store: MlflowSettings, tmp_path: Path, rouge_l: float, base: float = 0.3) -> RunTracker:
    """A run as the sft flow leaves it before publish: the adapter on disk, the eval stage's scores logged."""
    tracker = RunTracker.start(store, run_name=f"run-{rouge_l}", tags={})
    adapter = tmp_path / f"adapter-{tracker.run_id}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    tracker.log_metrics([("eval/rouge_l", rouge_l, 0), ("base/rouge_l", base, 0), ("gain/rouge_l", rouge_l - base, 0)])
    return tracker


def publish(tracker: RunTracker, tmp_path: Path, gate: GateSettings | None = None):
    """What the publish task does: the adapter as the run's logged model, then a version of it through the gate."""
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    model_id = log_adapter_model(tracker, tmp_path / f"adapter-{tracker.run_id}", FACTS, metrics)
    return publish_version(tracker, MODEL, model_id, FACTS, gate or GateSettings(), metrics, tmp_path / "publish.lock")


def aliases(tracker: RunTracker) -> dict[str, str]:
    return {alias: str(version) for alias, version in tracker.client.get_registered_model(MODEL).aliases.items()}


def test_a_passing_run_becomes_champion_and_a_worse_one_stays_candidate(store, tmp_path: Path) -> None:
    first = publish(trained_run(store, tmp_path, 10.0), tmp_path)
    assert first.decision.promote and first.version == "1" and first.champion == "1"
    worse = trained_run(store, tmp_path, 5.0)
    second = publish(worse, tmp_path)
    assert not second.decision.promote and second.champion == "1"
    assert "5 does not beat champion version 1's 10" in second.decision.reason
    assert aliases(worse) == {CHAMPION: "1", CANDIDATE: "2"}
    version = worse.client.get_model_version(MODEL, "2")
    assert version.tags["gate.verdict"] == "candidate"
    run = worse.client.get_run(worse.run_id)
    assert run.data.tags["publish/gate_verdict"] == "candidate" and run.data.tags["publish/version"] == "2"


def test_a_better_run_takes_the_champion_alias(store, tmp_path: Path) -> None:
    publish(trained_run(store, tmp_path, 10.0), tmp_path)
    better = trained_run(store, tmp_path, 12.0)
    assert publish(better, tmp_path).decision.promote
    assert aliases(better) == {CHAMPION: "2", CANDIDATE: "2"}


def test_a_run_below_the_base_model_or_the_threshold_is_not_promoted(store, tmp_path: Path) -> None:
    below_base = trained_run(store, tmp_path, 0.1, base=0.3)
    assert not publish(below_base, tmp_path).decision.promote
    below_threshold = trained_run(store, tmp_path, 10.0)
    assert not publish(below_threshold, tmp_path, GateSettings(threshold=50.0)).decision.promote
    assert CHAMPION not in aliases(below_base)


def test_publishing_a_run_again_registers_no_second_version(store, tmp_path: Path) -> None:
    tracker = trained_run(store, tmp_path, 10.0)
    first = publish(tracker, tmp_path)
    again = publish(tracker, tmp_path)
    assert again.version == first.version and not again.new_version
    assert again.decision.promote and "already the champion" in again.decision.reason
    assert len(tracker.client.search_model_versions(f"name='{MODEL}'")) == 1


def test_two_concurrent_publishes_leave_the_better_one_champion(
    store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(trained_run(store, tmp_path, 5.0), tmp_path)
    runs = [trained_run(store, tmp_path, 8.0), trained_run(store, tmp_path, 9.0)]
    read_champion = versions.current_champion

    def slow_for_the_worse_run(tracker: RunTracker, name: str, metric: str):
        # The worse run decides slowly: without one decision at a time it would promote itself over the better run
        # that became champion meanwhile, judged against the champion it read before.
        champion = read_champion(tracker, name, metric)
        if tracker.run_id == runs[0].run_id:
            time.sleep(1.0)
        return champion

    monkeypatch.setattr(versions, "current_champion", slow_for_the_worse_run)
    start = threading.Barrier(2)
    results = {}

    def run(tracker: RunTracker) -> None:
        start.wait()
        results[tracker.run_id] = publish(tracker, tmp_path)

    threads = [threading.Thread(target=run, args=(tracker,)) for tracker in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Whichever came first: the 9.0 run ends champion, never the 8.0 one promoted over it.
    champion = aliases(runs[0])[CHAMPION]
    assert runs[0].client.get_model_version(MODEL, champion).run_id == runs[1].run_id


def test_the_version_is_the_runs_logged_model_with_its_facts_and_linked_scores(store, tmp_path: Path) -> None:
    tracker = trained_run(store, tmp_path, 10.0)
    published = publish(tracker, tmp_path)
    client = tracker.client
    version = client.get_model_version(MODEL, published.version)
    model = client.get_logged_model(version.tags[MODEL_ID_TAG])
    assert model.status == LoggedModelStatus.READY and model.source_run_id == tracker.run_id
    assert model.tags["base_model"] == "qwen/Qwen1.5-7B" and model.tags["base_model.revision"] == "2f6b3c1e"
    assert {"template": "qwen", "dataset.key": "data-0123"}.items() <= version.tags.items()
    assert "qwen/Qwen1.5-7B at revision 2f6b3c1e" in version.description and tracker.run_id in version.description
    # MLflow's Models tab: the scores on the model, and the link to its registered version.
    assert {metric.key: metric.value for metric in model.metrics}["eval/rouge_l"] == 10.0
    assert json.loads(model.tags[MODEL_VERSIONS_TAG]) == [{"name": MODEL, "version": published.version}]
    # Linking re-logs each score's latest point: the run's history keeps it once.
    assert len(client.get_metric_history(tracker.run_id, "eval/rouge_l")) == 1
    files = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL, published.version),
        dst_path=str(tmp_path / "downloaded"),
        tracking_uri=store.tracking_uri,
    )
    assert (Path(files) / "adapter_model.safetensors").read_bytes() == b"weights"


def test_logging_the_adapter_again_reuses_the_runs_model(store, tmp_path: Path) -> None:
    tracker = trained_run(store, tmp_path, 10.0)
    adapter = tmp_path / f"adapter-{tracker.run_id}"
    assert log_adapter_model(tracker, adapter, FACTS, {}) == log_adapter_model(tracker, adapter, FACTS, {})


def test_a_publish_that_fails_midway_leaves_the_registry_as_it_was(store, tmp_path: Path) -> None:
    champion = trained_run(store, tmp_path, 10.0)
    publish(champion, tmp_path)
    broken = trained_run(store, tmp_path, 20.0)
    # A file that vanished under the upload (a disk cleaner, a truncated copy): the upload fails midway.
    (tmp_path / f"adapter-{broken.run_id}" / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(PublishError, match="nothing was registered"):
        publish(broken, tmp_path)
    client = broken.client
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert aliases(broken) == {CHAMPION: "1", CANDIDATE: "1"}
    experiment = client.get_run(broken.run_id).info.experiment_id
    (model,) = client.search_logged_models([experiment], filter_string=f"source_run_id = '{broken.run_id}'")
    assert model.status == LoggedModelStatus.FAILED


def test_a_name_with_a_quote_and_spaces_publishes_resolves_and_republishes(store, tmp_path: Path) -> None:
    """The name goes into MLflow's registry search filters, which have no escape: it is quoted with the other quote."""
    from npu_sft.publishing import registry

    name = "team's qwen adapter"
    tracker = trained_run(store, tmp_path, 10.0)
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    model_id = log_adapter_model(tracker, tmp_path / f"adapter-{tracker.run_id}", FACTS, metrics)
    lock = tmp_path / "publish.lock"
    first = publish_version(tracker, name, model_id, FACTS, GateSettings(), metrics, lock)
    again = publish_version(tracker, name, model_id, FACTS, GateSettings(), metrics, lock)
    assert first.version == again.version == "1"
    assert registry.resolve_version(store, name, "latest") == "1"
    assert registry.resolve_version(store, name, f"runs:/{tracker.run_id}") == "1"
    with pytest.raises(RegistryError, match="holds both quote characters"):
        registry.name_filter("""a'b"c""")

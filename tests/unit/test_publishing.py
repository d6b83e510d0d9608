from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from npu_sft import publishing
from npu_sft.gate import GateSettings
from npu_sft.publishing import CANDIDATE, CHAMPION, publish_version
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


def trained_run(store: MlflowSettings, tmp_path: Path, rouge_l: float, base: float = 0.3) -> RunTracker:
    """A run as the sft flow leaves it before publish: the adapter logged, the eval stage's scores."""
    tracker = RunTracker.start(store, run_name=f"run-{rouge_l}", tags={})
    adapter = tmp_path / f"adapter-{tracker.run_id}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tracker.log_artifact(adapter, "adapter")
    tracker.log_metrics([("eval/rouge_l", rouge_l, 0), ("base/rouge_l", base, 0), ("gain/rouge_l", rouge_l - base, 0)])
    return tracker


def publish(tracker: RunTracker, tmp_path: Path, gate: GateSettings | None = None):
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    return publish_version(tracker, MODEL, "adapter", gate or GateSettings(), metrics, tmp_path / "publish.lock")


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
    read_champion = publishing.current_champion

    def slow_for_the_worse_run(tracker: RunTracker, name: str, metric: str):
        # The worse run decides slowly: without one decision at a time it would promote itself over the better run
        # that became champion meanwhile, judged against the champion it read before.
        champion = read_champion(tracker, name, metric)
        if tracker.run_id == runs[0].run_id:
            time.sleep(1.0)
        return champion

    monkeypatch.setattr(publishing, "current_champion", slow_for_the_worse_run)
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

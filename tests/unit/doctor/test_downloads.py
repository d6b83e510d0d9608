"""`npu-sft doctor` on what a config downloads: the real `modelscope` client asks the hub stand-in for each repository
of configs/qwen7b.yaml (the model and LLaMA-Factory's alpaca_en), and the bytes still to come meet the cache's disk."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu_sft.doctor import Finding
from npu_sft.doctor.downloads import check_downloads
from npu_sft.download import download_model
from npu_sft.ports import unused_port
from npu_sft.settings import Pipeline, load_pipeline
from tests.fakes.hub_standin import HubStandIn
from tests.unit.download.test_datasets import ALPACA_EN, alpaca_en_files

REPO = Path(__file__).resolve().parents[3]
QWEN = "qwen/Qwen1.5-7B"
WEIGHTS = b"\0" * 300_000


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        yield standin


def qwen7b(endpoint: str, cache: Path, *overrides: str) -> Pipeline:
    return load_pipeline(REPO / "configs/qwen7b.yaml", [f"model.endpoint={endpoint}", f"model.cache_dir={cache}",
                                                       *overrides])


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.check: finding for finding in findings}


def plenty(_: Path) -> int:
    return 10**12


def test_each_repository_is_found_at_its_commit_and_its_bytes_meet_the_disk(hub: HubStandIn, tmp_path: Path) -> None:
    model_commit = hub.add_repo(QWEN, {"config.json": b"{}", "model.safetensors": WEIGHTS})
    hub.add_repo(ALPACA_EN, alpaca_en_files(rows=10), repo_type="dataset")
    pipeline = qwen7b(hub.url, tmp_path / "cache")

    found = by_check(check_downloads(pipeline, plenty))
    model = found[f"model {QWEN}"]
    assert model.status == "ok" and f"master = commit {model_commit}" in model.detail
    assert f"on {hub.url}: 2 files, 300.0 kB to download" in model.detail
    assert found[f"dataset {ALPACA_EN}"].status == "ok"
    assert found["disk"].status == "ok" and found["disk"].detail.startswith(f"{tmp_path / 'cache'}: 30")
    assert "to download, 1000.0 GB free" in found["disk"].detail
    assert not hub.file_requests()  # a listing, no file

    download_model(pipeline.settings.model, console_progress=False)  # type: ignore[arg-type]
    found = by_check(check_downloads(pipeline, plenty))
    assert found[f"model {QWEN}"].detail.endswith("2 files, 300.0 kB, complete in the cache")
    data_bytes = sum(len(content) for content in alpaca_en_files(rows=10).values())
    assert found["disk"].detail.startswith(f"{tmp_path / 'cache'}: {data_bytes} B to download")  # the data only


def test_too_little_room_for_the_model_is_an_error_saying_how_much(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo(QWEN, {"config.json": b"{}", "model.safetensors": WEIGHTS})
    hub.add_repo(ALPACA_EN, alpaca_en_files(rows=10), repo_type="dataset")
    found = by_check(check_downloads(qwen7b(hub.url, tmp_path / "cache"), lambda _: 100_000))
    assert found["disk"].status == "error" and "free" in found["disk"].detail
    assert found["disk"].fix.startswith("free ") and "model.cache_dir" in found["disk"].fix
    found = by_check(check_downloads(qwen7b(hub.url, tmp_path / "cache"), lambda _: None))
    assert found["disk"].status == "error" and "can not be written" in found["disk"].detail


def test_a_revision_the_model_does_not_have_names_the_key_and_the_branches(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo(QWEN, {"config.json": b"{}"})
    hub.add_repo(ALPACA_EN, alpaca_en_files(rows=10), repo_type="dataset")
    found = by_check(check_downloads(qwen7b(hub.url, tmp_path / "cache", "model.revision=v9"), plenty))
    model = found[f"model {QWEN}"]
    assert model.status == "error" and "has no revision 'v9' (its branches and tags: master)" in model.detail
    assert model.fix.endswith("qwen7b.yaml: model.id / model.revision")


def test_a_missing_dataset_repository_names_its_entry(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo(QWEN, {"config.json": b"{}"})
    found = by_check(check_downloads(qwen7b(hub.url, tmp_path / "cache"), plenty))
    dataset = found[f"dataset {ALPACA_EN}"]
    assert dataset.status == "error" and f"ModelScope has no dataset '{ALPACA_EN}'" in dataset.detail
    assert dataset.fix.endswith("data.datasets[1].repo_id / data.datasets[1].revision")


def test_a_hub_that_does_not_answer_is_asked_once(tmp_path: Path) -> None:
    silent = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    found = by_check(check_downloads(qwen7b(silent, tmp_path / "cache"), plenty))
    assert time.monotonic() - started < 30  # one attempt, not the download's retries with backoff
    model = found[f"model {QWEN}"]
    assert model.status == "error" and model.detail.endswith(f"the hub at {silent} does not answer ([Errno 111] "
                                                             "Connection refused)")
    assert "HTTPS_PROXY" in model.fix and "model.offline" in model.fix
    dataset = found[f"dataset {ALPACA_EN}"]
    assert dataset.status == "warning" and dataset.detail.startswith("not checked: the hub")
    assert "disk" not in found


def test_offline_without_a_cached_copy_is_an_error(tmp_path: Path) -> None:
    pipeline = qwen7b("http://127.0.0.1:9", tmp_path / "cache", "model.offline=true")
    model = by_check(check_downloads(pipeline, plenty))[f"model {QWEN}"]
    assert model.status == "error" and "offline" in model.detail and "model.offline: false" in model.fix


def test_the_demo_s_generated_model_and_builtin_data_download_nothing() -> None:
    assert check_downloads(load_pipeline(REPO / "configs/tiny_cpu.yaml"), plenty) == []

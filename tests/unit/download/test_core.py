"""download_model with the real `modelscope` client against a local stand-in of the hub (tests/fakes/hub_standin.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from npu_sft.download import (
    DownloadedModel,
    DownloadProgress,
    HubNotFoundError,
    HubUnavailableError,
    IntegrityError,
    LocalSourceError,
    ModelSource,
    OfflineCacheMissError,
    UnpinnedRevisionWarning,
    download_model,
    find_cached_download,
)
from npu_sft.download.locking import repo_download_lock, repo_lock_path
from npu_sft.download.manifest import RECORD_FILE_NAME
from tests.fakes.hub_standin import HubStandIn

MODEL_ID = "qwen/Tiny-Qwen"
WEIGHTS = "model.safetensors"
WEIGHTS_SIZE = 400 * 1024


def tiny_model_files(seed: int = 0) -> dict[str, bytes]:
    """A small model repository: configs, a tokenizer and a few hundred KB of (random) weights."""
    weights = hashlib.sha256(str(seed).encode()).digest() * (WEIGHTS_SIZE // 32)
    weights = os.urandom(WEIGHTS_SIZE) if seed == 0 else weights
    return {
        "config.json": json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "seed": seed}).encode(),
        "generation_config.json": b'{"max_new_tokens": 32}',
        WEIGHTS: weights,
        "tokenizer.json": json.dumps({"model": {"type": "BPE"}, "added_tokens": []}).encode(),
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "README.md": b"# tiny\n",
    }


@pytest.fixture
def files() -> dict[str, bytes]:
    return tiny_model_files()


@pytest.fixture
def hub(files: dict[str, bytes]) -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        standin.add_repo(MODEL_ID, files, tags=("v1.0",), unhashed=("README.md",))
        yield standin


@pytest.fixture(autouse=True)
def no_ambient_hub_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELSCOPE_API_TOKEN", "MODELSCOPE_CACHE", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)


def source(hub: HubStandIn | None, cache: Path, **overrides: Any) -> ModelSource:
    fields: dict[str, Any] = {
        "source": "modelscope",
        "id": MODEL_ID,
        "endpoint": hub.url if hub else "http://127.0.0.1:9",
        "cache_dir": cache,
        "retries": 2,
        "retry_backoff_s": 0.01,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpinnedRevisionWarning)
        return ModelSource(**{**fields, **overrides})


def head_commit(hub: HubStandIn, repo_id: str = MODEL_ID) -> str:
    return hub.repos[("model", repo_id)].branches["master"]


def download(src: ModelSource, **kwargs: Any) -> DownloadedModel:
    return download_model(src, console_progress=False, **kwargs)


def assert_same_files(downloaded: DownloadedModel, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (downloaded.path / name).read_bytes() == data, name


# -- fresh download, manifest, caching ------------------------------------------------------------------------


def test_fresh_download_produces_the_files_and_a_manifest(hub: HubStandIn, files: dict[str, bytes], tmp_path: Path):
    downloaded = download(source(hub, tmp_path))

    assert_same_files(downloaded, files)
    assert downloaded.from_cache is False
    assert downloaded.revision == "master"
    assert downloaded.resolved_revision == head_commit(hub)
    assert downloaded.path.is_relative_to(tmp_path)
    expected = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    expected["README.md"] = (len(files["README.md"]), None)  # the hub lists no sha256 for it
    assert {e.path: (e.size, e.sha256) for e in downloaded.manifest} == expected
    assert downloaded.total_bytes == sum(len(data) for data in files.values())

    assert downloaded.manifest_path == downloaded.path / RECORD_FILE_NAME
    record = json.loads(downloaded.manifest_path.read_text())
    assert record["resolved_revision"] == head_commit(hub)
    assert record["model_id"] == MODEL_ID
    assert {entry["path"] for entry in record["files"]} == set(files)


def test_second_run_makes_no_file_requests(hub: HubStandIn, tmp_path: Path):
    first = download(source(hub, tmp_path))
    hub.clear_log()

    second = download(source(hub, tmp_path))

    assert second.from_cache is True
    assert second.path == first.path and second.manifest == first.manifest
    assert hub.file_requests() == []
    # One listing request to learn which commit `master` is now; nothing else.
    assert [r.path for r in hub.requests] == [f"/api/v1/models/{MODEL_ID}/repo/files"]


def test_pinned_commit_found_in_the_cache_makes_no_request_at_all(hub: HubStandIn, tmp_path: Path):
    commit = head_commit(hub)
    download(source(hub, tmp_path, revision=commit))
    hub.clear_log()

    again = download(source(hub, tmp_path, revision=commit))

    assert again.from_cache is True and again.resolved_revision == commit
    assert hub.requests == []


def test_a_branch_that_moved_is_downloaded_at_its_new_commit(hub: HubStandIn, files: dict[str, bytes], tmp_path: Path):
    old = download(source(hub, tmp_path))
    new_files = tiny_model_files(seed=1)
    new_commit = hub.add_repo(MODEL_ID, new_files)

    new = download(source(hub, tmp_path))

    assert new.from_cache is False and new.resolved_revision == new_commit != old.resolved_revision
    assert_same_files(new, new_files)
    assert_same_files(old, files)  # the old commit's copy is left as it was


def test_tag_and_patterns_select_a_subset(hub: HubStandIn, tmp_path: Path):
    downloaded = download(source(hub, tmp_path, revision="v1.0", allow_patterns=["*.json"], ignore_patterns=["gen*"]))

    assert sorted(e.path for e in downloaded.manifest) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(r.file_path for r in hub.file_requests()) == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert downloaded.resolved_revision == head_commit(hub)


def test_a_dataset_repository_downloads_through_the_same_path(hub: HubStandIn, tmp_path: Path):
    rows = {f"data/train-{i}.jsonl": json.dumps({"instruction": f"q{i}", "output": "a"}).encode() for i in range(3)}
    commit = hub.add_repo("demo/sft-data", rows, repo_type="dataset")

    downloaded = download(source(hub, tmp_path, id="demo/sft-data", repo_type="dataset"))

    assert downloaded.repo_type == "dataset" and downloaded.resolved_revision == commit
    assert_same_files(downloaded, rows)
    assert any(r.path == "/api/v1/datasets/demo/sft-data/repo/tree" for r in hub.requests)


def test_progress_is_reported_in_bytes_up_to_100_percent(hub: HubStandIn, tmp_path: Path):
    hub.throttle(WEIGHTS, 2 * 1024 * 1024)  # ~0.2 s, so intermediate progress is visible
    seen: list[DownloadProgress] = []

    download(source(hub, tmp_path), on_progress=seen.append)

    assert seen[-1].percent == 100.0
    assert any(0 < p.percent < 100 for p in seen)
    assert [p.done_bytes for p in seen] == sorted(p.done_bytes for p in seen)


# -- resuming and verifying -------------------------------------------------------------------------------------


def test_a_transfer_cut_off_mid_file_resumes_with_a_range_request(
    hub: HubStandIn, files: dict[str, bytes], tmp_path: Path
):
    hub.cut_transfer(WEIGHTS, after_bytes=150_000)

    downloaded = download(source(hub, tmp_path))

    assert_same_files(downloaded, files)
    requests = hub.file_requests(WEIGHTS)
    assert requests[0].range is None
    resumed_from = int(requests[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 150_000 and requests[1].status == 206
    assert hub.bytes_sent(WEIGHTS) < WEIGHTS_SIZE + 150_000  # not restarted from zero


def test_a_killed_download_resumes_in_the_next_run(hub: HubStandIn, files: dict[str, bytes], tmp_path: Path):
    commit = head_commit(hub)
    src = source(hub, tmp_path, revision=commit)
    hub.throttle(WEIGHTS, 200 * 1024)
    child = start_download_process(src)
    wait_for(lambda: hub.bytes_sent(WEIGHTS) >= WEIGHTS_SIZE // 3, timeout_s=20)
    child.send_signal(signal.SIGKILL)  # no cleanup at all, as when a node is rebooted
    child.wait(timeout=10)
    hub.faults.throttle.clear()

    downloaded = download(src)

    assert_same_files(downloaded, files)
    last = hub.file_requests(WEIGHTS)[-1]
    assert last.range is not None and last.range.startswith("bytes=") and last.status == 206
    assert int(last.range.removeprefix("bytes=").rstrip("-")) > 0


def test_a_file_that_does_not_match_its_sha256_is_rejected_and_not_used(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # ModelScope re-fetches a mismatching file twice before giving up, 1 s + 2 s apart; tests need no wait.
    monkeypatch.setattr("modelscope_hub._download.DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)
    hub.corrupt(WEIGHTS)

    with pytest.raises(IntegrityError, match=WEIGHTS) as caught:
        download(source(hub, tmp_path))

    assert MODEL_ID in str(caught.value)
    assert not list(tmp_path.rglob(WEIGHTS)), "the corrupted file must not be left where it would be used"
    assert not list(tmp_path.rglob(RECORD_FILE_NAME))
    assert len(hub.file_requests(WEIGHTS)) <= 3, "integrity failures are not retried as network errors"


def test_the_clients_own_error_lines_become_warnings(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The failure is raised as one error naming the repository; modelscope_hub's ERROR line would say it twice.
    monkeypatch.setattr("modelscope_hub._download.DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01)
    hub.corrupt(WEIGHTS)
    seen: list[logging.LogRecord] = []
    handler = logging.getLogger("modelscope_hub").handlers[0]
    monkeypatch.setattr(handler, "emit", seen.append)

    with pytest.raises(IntegrityError):
        download(source(hub, tmp_path))

    failures = [record for record in seen if "Failed to download" in record.getMessage()]
    assert failures and {record.levelname for record in failures} == {"WARNING"}


def test_a_cached_file_corrupted_on_disk_is_detected_and_fetched_again(
    hub: HubStandIn, files: dict[str, bytes], tmp_path: Path
):
    first = download(source(hub, tmp_path))
    weights = first.path / WEIGHTS
    weights.write_bytes(b"\0" * WEIGHTS_SIZE)  # same size, other bytes, new mtime
    hub.clear_log()

    with pytest.raises(OfflineCacheMissError, match=f"{WEIGHTS}: sha256"):
        download(source(hub, tmp_path, offline=True, revision=first.resolved_revision))
    repaired = download(source(hub, tmp_path))

    assert repaired.from_cache is False
    assert_same_files(repaired, files)
    assert [r.file_path for r in hub.file_requests()] == [WEIGHTS]


# -- errors: clear, and no retry storm --------------------------------------------------------------------------


def test_an_unknown_model_fails_at_once_with_a_clear_message(hub: HubStandIn, tmp_path: Path):
    with pytest.raises(HubNotFoundError) as caught:
        download(source(hub, tmp_path, id="qwen/No-Such-Model", retries=5))

    message = str(caught.value)
    assert "qwen/No-Such-Model" in message and "master" in message and "no model" in message
    assert len(hub.requests) <= 2  # the listing, then the revisions lookup that explains the 404
    assert not caught.value.retryable


def test_an_unknown_revision_fails_at_once_naming_the_revisions_that_exist(hub: HubStandIn, tmp_path: Path):
    with pytest.raises(HubNotFoundError) as caught:
        download(source(hub, tmp_path, revision="v9.9", retries=5))

    message = str(caught.value)
    assert MODEL_ID in message and "'v9.9'" in message and "master" in message and "v1.0" in message
    assert len(hub.requests) <= 2


def test_a_hub_answering_503_gets_bounded_retries_then_a_clear_error(hub: HubStandIn, tmp_path: Path):
    hub.fail_all(503)

    with pytest.raises(HubUnavailableError) as caught:
        download(source(hub, tmp_path, retries=2))

    assert MODEL_ID in str(caught.value) and "3 attempts" in str(caught.value)
    assert caught.value.retryable
    assert len(hub.requests) == 3


def test_a_hub_that_is_down_gets_bounded_retries_then_a_clear_error(tmp_path: Path):
    down = HubStandIn().start()
    url = down.url
    down.stop()  # the port is closed: connections are refused
    src = source(None, tmp_path, endpoint=url, retries=3)

    started = time.monotonic()
    with pytest.raises(HubUnavailableError, match="unreachable after 4 attempts"):
        download(src)

    assert time.monotonic() - started < 5


# -- offline ----------------------------------------------------------------------------------------------------


def test_offline_with_an_empty_cache_fails_clearly_without_requests(hub: HubStandIn, tmp_path: Path):
    with pytest.raises(OfflineCacheMissError, match=r"offline, and .* holds no copy"):
        download(source(hub, tmp_path, offline=True))

    assert hub.requests == []


def test_offline_with_a_full_cache_works_without_requests(hub: HubStandIn, files: dict[str, bytes], tmp_path: Path):
    online = download(source(hub, tmp_path))
    hub.clear_log()

    offline = download(source(hub, tmp_path, offline=True))

    assert offline.from_cache is True and offline.path == online.path
    assert offline.resolved_revision == online.resolved_revision
    assert_same_files(offline, files)
    assert hub.requests == []


def test_offline_adopts_a_copy_downloaded_by_plain_modelscope(hub: HubStandIn, files: dict[str, bytes], tmp_path: Path):
    from modelscope import snapshot_download

    snapshot_download(MODEL_ID, cache_dir=str(tmp_path), endpoint=hub.url)  # e.g. by LLaMA-Factory's container
    hub.clear_log()

    adopted = download(source(hub, tmp_path, offline=True))

    assert_same_files(adopted, files)
    assert hub.requests == []


# -- concurrency ------------------------------------------------------------------------------------------------

CHILD = """
import json, sys
from npu_sft.download import ModelSource, download_model
source = ModelSource.model_validate_json(sys.argv[1])
print("started", flush=True)
downloaded = download_model(source, console_progress=False)
print(json.dumps({"from_cache": downloaded.from_cache, "path": str(downloaded.path)}), flush=True)
"""


def start_download_process(src: ModelSource) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", CHILD, src.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def test_two_processes_downloading_the_same_model_end_with_one_verified_copy(
    hub: HubStandIn, files: dict[str, bytes], tmp_path: Path
):
    src = source(hub, tmp_path)
    hub.throttle(WEIGHTS, 1024 * 1024)
    # Hold the repository's lock while both start, so that they really contend for it.
    with repo_download_lock(repo_lock_path(tmp_path, "model", MODEL_ID), timeout_s=10, what="test"):
        children = [start_download_process(src) for _ in range(2)]
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "started"
        time.sleep(0.3)
        assert hub.requests == [], "nobody may touch the hub while another process holds the lock"
    outputs = [child.communicate(timeout=60) for child in children]

    assert [child.returncode for child in children] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["from_cache"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    assert hub.bytes_sent(WEIGHTS) == WEIGHTS_SIZE  # fetched exactly once
    cached = find_cached_download(source(hub, tmp_path, revision=head_commit(hub)))
    assert cached is not None and str(cached.path) == results[0]["path"]
    assert_same_files(cached, files)


# -- local sources ----------------------------------------------------------------------------------------------


def write_model_dir(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def test_a_local_model_directory_is_used_in_place(files: dict[str, bytes], tmp_path: Path):
    directory = write_model_dir(tmp_path / "Tiny", files)

    downloaded = download_model(ModelSource(source="local", path=directory))

    assert downloaded.path == directory and downloaded.source == "local" and downloaded.from_cache
    assert {e.path for e in downloaded.manifest} == set(files)
    assert downloaded.resolved_revision.startswith("local-")
    assert not (directory / RECORD_FILE_NAME).exists(), "a local directory is not written to"


@pytest.mark.parametrize(
    ("remove", "extra", "message"),
    [
        ("config.json", {}, "no config.json"),
        (WEIGHTS, {}, "no weights"),
        (
            WEIGHTS,
            {"model.safetensors.index.json": b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'},
            "shards",
        ),
    ],
)
def test_a_local_directory_that_is_not_a_model_is_refused(
    files: dict[str, bytes], tmp_path: Path, remove: str, extra: dict[str, bytes], message: str
):
    directory = write_model_dir(tmp_path / "Tiny", {**{k: v for k, v in files.items() if k != remove}, **extra})

    with pytest.raises(LocalSourceError, match=message):
        download_model(ModelSource(source="local", path=directory))


def test_a_missing_local_directory_is_refused(tmp_path: Path):
    with pytest.raises(LocalSourceError, match="not a directory"):
        download_model(ModelSource(source="local", path=tmp_path / "nowhere"))


# -- settings and secrets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "local"}, "needs a path"),
        ({"source": "modelscope"}, "needs an id"),
        ({"source": "modelscope", "id": "Qwen1.5-7B"}, "owner/name"),
        ({"source": "modelscope", "id": "qwen/Qwen1.5-7B", "path": "/models/x"}, "takes no path"),
        ({"source": "local", "path": "/models/x", "allow_patterns": ["*.json"]}, "takes no allow_patterns"),
        ({"source": "modelscope", "id": "qwen/Qwen1.5-7B", "token": "abc"}, "Extra inputs are not permitted"),
        ({"source": "modelscope", "id": "qwen/Qwen1.5-7B", "endpoint": "modelscope.cn"}, "http"),
        ({"source": "modelscope", "id": "qwen/Qwen1.5-7B", "endpoint": "https://u:p@hub.example"}, "credentials"),
        ({"source": "hf", "id": "qwen/Qwen1.5-7B"}, "modelscope"),
    ],
)
def test_invalid_sources_are_refused_with_a_clear_message(fields: dict[str, Any], message: str):
    with pytest.raises(ValidationError, match=message):
        ModelSource(**fields)


def test_an_unpinned_revision_warns_and_a_commit_does_not():
    with pytest.warns(UnpinnedRevisionWarning, match="master"):
        ModelSource(source="modelscope", id="qwen/Qwen1.5-7B")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelSource(source="modelscope", id="qwen/Qwen1.5-7B", revision="a" * 40)


def test_the_default_cache_is_modelscopes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    src = ModelSource(source="modelscope", id="qwen/Qwen1.5-7B", revision="a" * 40)
    assert src.resolved_cache_dir() == (Path.home() / ".cache" / "modelscope").resolve()
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    assert src.resolved_cache_dir() == tmp_path.resolve()


def test_the_token_comes_from_the_environment_and_is_never_logged_or_recorded(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    secret = "ms-secret-7f3a9c"
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", secret)
    caplog.set_level(logging.DEBUG)

    src = source(hub, tmp_path)
    downloaded = download(src)

    assert any(secret in (r.authorization or "") for r in hub.requests), "the hub should receive the token"
    assert secret not in caplog.text
    assert secret not in src.model_dump_json() and secret not in downloaded.model_dump_json()
    assert secret not in json.dumps(downloaded.manifest_document())
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]

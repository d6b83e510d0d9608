"""Resolving a branch or tag to its commit from what the hub reports (npu_sft/download/commits.py), with the real
`modelscope` client against the hub stand-in, which answers in the shapes modelscope.cn uses (tests/fakes/hub_standin.py)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from npu_sft.download import (
    DownloadedModel,
    HubNotFoundError,
    ModelSource,
    UnpinnedRevisionError,
    UnpinnedRevisionWarning,
    download_model,
)
from npu_sft.download.commits import parse_ref_advertisement
from tests.fakes.hub_standin import HubStandIn

MODEL_ID = "qwen/Tiny-Qwen"
DATASET_ID = "team/tiny-data"
FIRST = {"config.json": b'{"hidden_size": 64}', "model.safetensors": b"\x01" * 4096, "README.md": b"# v1\n"}
SECOND = {**FIRST, "README.md": b"# v2: only the card changed\n"}


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        standin.add_repo(MODEL_ID, FIRST)
        standin.add_repo(MODEL_ID, SECOND, tags=("v2",))
        yield standin


@pytest.fixture(autouse=True)
def no_ambient_hub_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELSCOPE_API_TOKEN", "MODELSCOPE_CACHE", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)


def source(hub: HubStandIn, cache: Path, **overrides: Any) -> ModelSource:
    fields: dict[str, Any] = {"source": "modelscope", "id": MODEL_ID, "endpoint": hub.url, "cache_dir": cache,
                              "retries": 0, "retry_backoff_s": 0.01}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnpinnedRevisionWarning)
        return ModelSource(**{**fields, **overrides})


def download(src: ModelSource) -> DownloadedModel:
    return download_model(src, console_progress=False)


def head(hub: HubStandIn, repo_type: str = "model", repo_id: str = MODEL_ID) -> str:
    return hub.repos[(repo_type, repo_id)].branches["master"]


def routes(hub: HubStandIn) -> list[str]:
    return [request.path.rsplit("/", 1)[-1] for request in hub.requests]


# -- the answer shapes (each one as modelscope.cn gives it) ----------------------------------------------------


def test_the_listing_reports_the_head_only_by_its_short_id(hub: HubStandIn) -> None:
    # A saved modelscope.cn answer of /repo/files leaves LatestCommitter.Id empty; clients of the hub match the
    # 8-character ShortId instead (issue 17).
    body = requests.get(f"{hub.url}/api/v1/models/{MODEL_ID}/repo/files", params={"Revision": "master"}).json()
    committer = body["Data"]["LatestCommitter"]
    assert committer["Id"] == "" and committer["ShortId"] == head(hub)[:8]


def test_each_listed_file_carries_the_last_commit_that_touched_it(hub: HubStandIn) -> None:
    # The hub's per-file `Revision`: files unchanged by the head keep the older commit (issue 17).
    files = requests.get(f"{hub.url}/api/v1/models/{MODEL_ID}/repo/files").json()["Data"]["Files"]
    revisions = {entry["Path"]: entry["Revision"] for entry in files}
    first = hub.repos[("model", MODEL_ID)].commits[head(hub)].parent
    assert revisions == {"README.md": head(hub), "config.json": first, "model.safetensors": first}


def test_an_unknown_revision_is_a_success_without_files(hub: HubStandIn) -> None:
    # The hub answers a revision a known repository lacks with Code 200 and `Files: null` (issue 17).
    body = requests.get(f"{hub.url}/api/v1/models/{MODEL_ID}/repo/files", params={"Revision": "v9"}).json()
    assert body["Success"] is True and body["Data"]["Files"] is None


def test_an_unknown_repository_is_the_hubs_404_envelope(hub: HubStandIn) -> None:
    response = requests.get(f"{hub.url}/api/v1/models/qwen/Nope/repo/files")
    assert response.status_code == 404
    assert response.json()["Success"] is False and response.json()["Code"] != 200


def test_the_commit_history_is_newest_first(hub: HubStandIn) -> None:
    # What modelscope's list_repo_commits (1.29-1.35) reads: Data.Commit[] with Id and ShortId, TotalCount beside.
    body = requests.get(f"{hub.url}/api/v1/models/{MODEL_ID}/commits", params={"Ref": "master"}).json()
    assert [c["Id"] for c in body["Data"]["Commit"]][0] == head(hub) and body["TotalCount"] == 2


def test_the_ref_advertisement_parses_to_branches_and_peeled_tags(hub: HubStandIn) -> None:
    # git's smart-HTTP protocol at the clone URL modelscope-hub builds ({endpoint}/models/{id}.git).
    response = requests.get(f"{hub.url}/models/{MODEL_ID}.git/info/refs", params={"service": "git-upload-pack"})
    refs = parse_ref_advertisement(response.content)
    assert refs["refs/heads/master"] == head(hub) == refs["refs/tags/v2^{}"] != refs["refs/tags/v2"]


def test_a_garbled_ref_advertisement_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_ref_advertisement(b"<html>login</html>")


# -- resolution -------------------------------------------------------------------------------------------------


def test_a_branch_resolves_to_the_head_from_the_files_it_changed(hub: HubStandIn, tmp_path: Path) -> None:
    downloaded = download(source(hub, tmp_path))

    assert downloaded.resolved_revision == head(hub)
    assert "commits" not in routes(hub) and "refs" not in routes(hub)  # no request beyond the listing


def test_a_head_that_touched_no_listed_file_resolves_through_the_history(hub: HubStandIn, tmp_path: Path) -> None:
    newest = hub.add_repo(MODEL_ID, SECOND)  # same files again: every file keeps an older Revision

    downloaded = download(source(hub, tmp_path))

    assert downloaded.resolved_revision == newest
    assert "commits" in routes(hub)


def test_without_a_history_route_the_ref_advertisement_resolves_it(hub: HubStandIn, tmp_path: Path) -> None:
    newest = hub.add_repo(MODEL_ID, SECOND)
    hub.disable("commits")

    assert download(source(hub, tmp_path)).resolved_revision == newest
    assert "refs" in routes(hub)


def test_a_tag_resolves_to_the_commit_it_points_to(hub: HubStandIn, tmp_path: Path) -> None:
    tagged = head(hub)
    hub.add_repo(MODEL_ID, {**SECOND, "README.md": b"# v3\n"})

    assert download(source(hub, tmp_path, revision="v2")).resolved_revision == tagged


def test_a_history_that_disagrees_with_the_short_id_is_not_trusted(
    hub: HubStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    oldest = head(hub)
    hub.add_repo(MODEL_ID, SECOND)
    hub.disable("git")
    repo = hub.repos[("model", MODEL_ID)]
    # A history in another order than newest first would name an older commit: it must not be pinned.
    repo.history = lambda revision: [repo.commits[oldest]]  # type: ignore[method-assign]

    with caplog.at_level(logging.WARNING, logger="npu_sft.download.core"):
        downloaded = download(source(hub, tmp_path))

    assert downloaded.resolved_revision == "master"
    assert "did not report which commit" in caplog.text


def test_an_unresolvable_branch_downloads_unpinned_with_a_warning(
    hub: HubStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub.add_repo(MODEL_ID, SECOND)
    hub.disable("commits")
    hub.disable("git")

    with caplog.at_level(logging.WARNING, logger="npu_sft.download.core"):
        downloaded = download(source(hub, tmp_path))

    assert downloaded.resolved_revision == "master"
    assert "did not report which commit" in caplog.text


def test_require_pinned_stops_an_unresolvable_branch_before_any_file_request(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo(MODEL_ID, SECOND)
    hub.disable("commits")
    hub.disable("git")

    with pytest.raises(UnpinnedRevisionError) as caught:
        download(source(hub, tmp_path, require_pinned=True))

    message = str(caught.value)
    assert f"{MODEL_ID}@master" in message and "require_pinned" in message and "\n" not in message
    assert not hub.file_requests()


def test_require_pinned_lets_a_resolvable_branch_through(hub: HubStandIn, tmp_path: Path) -> None:
    assert download(source(hub, tmp_path, require_pinned=True)).resolved_revision == head(hub)


def test_a_pinned_commit_is_used_as_is(hub: HubStandIn, tmp_path: Path) -> None:
    first = hub.repos[("model", MODEL_ID)].commits[head(hub)].parent
    assert first is not None

    downloaded = download(source(hub, tmp_path, revision=first, require_pinned=True))

    assert downloaded.resolved_revision == first
    assert (downloaded.path / "README.md").read_bytes() == FIRST["README.md"]
    assert "commits" not in routes(hub) and "refs" not in routes(hub)


def test_an_unknown_revision_names_the_revisions_that_exist(hub: HubStandIn, tmp_path: Path) -> None:
    with pytest.raises(HubNotFoundError) as caught:
        download(source(hub, tmp_path, revision="v9"))

    assert "'v9'" in str(caught.value) and "master" in str(caught.value) and "v2" in str(caught.value)


def test_a_dataset_branch_resolves_to_its_head(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo(DATASET_ID, {"train.jsonl": b'{"instruction": "hi", "output": "hello"}\n'}, repo_type="dataset")
    newest = hub.add_repo(DATASET_ID, {"train.jsonl": b'{"instruction": "hi", "output": "hello"}\n'},
                          repo_type="dataset")  # a head no file carries: through the dataset's history

    downloaded = download(source(hub, tmp_path, id=DATASET_ID, repo_type="dataset"))

    assert downloaded.resolved_revision == newest == head(hub, "dataset", DATASET_ID)

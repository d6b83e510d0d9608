"""Which commit a branch or tag points to, from what the ModelScope hub actually reports.

modelscope.cn leaves the listing's `LatestCommitter.Id` empty. It reports `LatestCommitter.ShortId` (the head
commit's first 8 characters), and each file's `Revision` is the full id of the last commit that touched that file,
which may be older than the head. So the head is found, cheapest first:

1. a listed file whose `Revision` starts with the short id (no extra request: the head changed that file);
2. else the commit history of the revision (`GET .../commits?Ref=`, what modelscope's `list_repo_commits` reads),
   newest first;
3. else git's ref advertisement at the clone URL (`{endpoint}/{models|datasets}/{id}.git/info/refs`).

An answer from 2 or 3 counts only if it agrees with the short id, so a hub that orders its history differently
can never pin the wrong commit. None when nothing agrees: the caller decides whether an unpinned run may go on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import requests
from modelscope_hub import HubApi
from modelscope_hub.errors import HubError

from npu_sft.download.settings import is_commit_id

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 30.0
# Git reports a short id of at least 7 characters; anything shorter could match the wrong commit.
MIN_SHORT_ID = 7
_PKT_LENGTH = re.compile(rb"^[0-9a-f]{4}$")
# A lookup that fails this way is only unavailable (a hub without the route, a network blip): the next one is tried.
_LOOKUP_ERRORS: tuple[type[BaseException], ...] = (HubError, requests.RequestException, OSError)


def head_commit(
    api: HubApi,
    *,
    endpoint: str,
    token: str,
    repo_type: str,
    repo_id: str,
    revision: str,
    listing_pages: Iterable[dict[str, Any]],
) -> str | None:
    """The full commit id `revision` points to now, or None when the hub does not say it in any way we can check."""
    pages = list(listing_pages)
    reported, short_id = reported_commit(pages[0] if pages else {})
    if reported:
        return reported
    from_files = commit_from_file_revisions(short_id, pages)
    if from_files:
        return from_files
    for name, lookup in (
        ("commit history", lambda: commit_from_history(api, repo_type, repo_id, revision)),
        ("ref advertisement", lambda: commit_from_git_refs(endpoint, token, repo_type, repo_id, revision)),
    ):
        try:
            candidate = lookup()
        except (*_LOOKUP_ERRORS, ValueError) as error:
            log.debug("%s@%s: %s unavailable (%s)", repo_id, revision, name, error)
            continue
        if candidate and _agrees(candidate, short_id):
            return candidate
        if candidate:
            log.debug("%s@%s: %s says %s, the listing %s", repo_id, revision, name, candidate, short_id)
    return None


def reported_commit(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """(`LatestCommitter.Id` if the hub filled it with a commit id, `LatestCommitter.ShortId`)."""
    committer = data.get("LatestCommitter")
    if not isinstance(committer, dict):
        return None, None
    full = str(committer.get("Id") or "").lower()
    short = str(committer.get("ShortId") or "").lower()
    return (full if is_commit_id(full) else None), (short if len(short) >= MIN_SHORT_ID else None)


def commit_from_file_revisions(short_id: str | None, pages: Iterable[dict[str, Any]]) -> str | None:
    """The one file `Revision` that starts with the short id: the head commit, when it touched a listed file."""
    if not short_id:
        return None
    matches = {
        str(entry.get("Revision")).lower()
        for page in pages
        for entry in page.get("Files") or []
        if isinstance(entry, dict) and str(entry.get("Revision") or "").lower().startswith(short_id)
    }
    matches = {commit for commit in matches if is_commit_id(commit)}
    return matches.pop() if len(matches) == 1 else None


def commit_from_history(api: HubApi, repo_type: str, repo_id: str, revision: str) -> str | None:
    """The newest commit of `revision`'s history, through the client's transport (auth, user agent, errors)."""
    params = {"Ref": revision, "PageNumber": 1, "PageSize": 1}
    response = api.legacy._request("GET", f"{repo_type}s/{repo_id}/commits", params=params, single_attempt=True)
    body = response.json()
    data = body.get("Data") if isinstance(body, dict) else None
    commits = data.get("Commit") if isinstance(data, dict) else None
    if not commits or not isinstance(commits[0], dict):
        return None
    commit = str(commits[0].get("Id") or "").lower()
    return commit if is_commit_id(commit) else None


def commit_from_git_refs(endpoint: str, token: str, repo_type: str, repo_id: str, revision: str) -> str | None:
    """`revision` as a branch or (peeled) tag in git's smart-HTTP ref advertisement of the repository."""
    url = f"{endpoint.rstrip('/')}/{repo_type}s/{repo_id}.git/info/refs"
    # The clone URL's credentials, as modelscope-hub's git wrapper sends them; none for a public repository.
    auth = ("oauth2", token) if token else None
    response = requests.get(url, params={"service": "git-upload-pack"}, auth=auth, timeout=GIT_TIMEOUT_S)
    response.raise_for_status()
    refs = parse_ref_advertisement(response.content)
    for name in (f"refs/tags/{revision}^{{}}", f"refs/heads/{revision}", f"refs/tags/{revision}"):
        if name in refs:
            return refs[name]
    return None


def parse_ref_advertisement(body: bytes) -> dict[str, str]:
    """Ref name -> commit id, from git's pkt-line ref advertisement (capabilities and service lines dropped)."""
    refs: dict[str, str] = {}
    position = 0
    while position + 4 <= len(body):
        length_field = body[position : position + 4]
        if not _PKT_LENGTH.match(length_field):
            raise ValueError("not a git ref advertisement")
        length = int(length_field, 16)
        if length == 0:  # flush packet
            position += 4
            continue
        line = body[position + 4 : position + length].rstrip(b"\n").split(b"\0", 1)[0].decode()
        position += length
        commit, _, name = line.partition(" ")
        if is_commit_id(commit.lower()) and name:
            refs[name] = commit.lower()
    return refs


def _agrees(commit: str, short_id: str | None) -> bool:
    return short_id is None or commit.startswith(short_id)

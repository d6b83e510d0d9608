"""The ModelScope hub, through the real `modelscope` client: resolving a revision, downloading, classifying errors.

Everything that touches the network is here. Files are fetched by `modelscope.snapshot_download`, which resumes
partial files with Range requests, verifies each file's sha256 against the hub's listing, and never leaves a
rejected file in place. This module adds what it lacks: the commit a branch resolves to, retries that tell a
network error (worth retrying) from a 404 (not), and messages that name the repository and revision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from modelscope import snapshot_download
from modelscope_hub import HubApi, ProgressCallback
from modelscope_hub.config import get_default_config
from modelscope_hub.utils.logger import get_logger as modelscope_hub_logger
from modelscope_hub.errors import (
    AuthenticationError,
    FileDownloadError,
    FileIntegrityError,
    HubError,
    InvalidParameter,
    NetworkError,
    NotExistError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)

from npu_sft.download.commits import head_commit
from npu_sft.download.errors import (
    DownloadError,
    HubAccessError,
    HubNotFoundError,
    HubUnavailableError,
    IntegrityError,
)
from npu_sft.download.manifest import ManifestEntry
from npu_sft.download.settings import TOKEN_ENV_VAR, ModelSource, hub_token, is_commit_id

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BACKOFF_S = 60.0
# The hub's `repo/files` listing silently stops at this many entries; ModelScope's client then walks the tree.
LISTING_TRUNCATION_LIMIT = 3000
DATASET_PAGE_SIZE = 200

# Failures of the transport or of the server, after which the same request may well succeed.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    NetworkError,  # connection refused/reset, timeouts (RequestTimeoutError), stalled transfers
    ServerError,  # HTTP 5xx
    RateLimitError,  # HTTP 429
    requests.ConnectionError,
    requests.Timeout,
    ConnectionError,
    TimeoutError,
)
# What the client raises, directly or wrapped: the only exceptions a hub call is expected to end with.
HUB_CALL_ERRORS: tuple[type[BaseException], ...] = (HubError, requests.RequestException, OSError)


class DemoteClientErrors(logging.Filter):
    """modelscope_hub logs a failed file at ERROR, then raises: we re-raise it as one error naming the repository.

    Kept as a warning, so the console says the failure once as an error (the run's last line) and loses nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def demote_client_errors() -> None:
    """Install `DemoteClientErrors` on the handler modelscope_hub gives its own logger (idempotent)."""
    for handler in modelscope_hub_logger().handlers:
        if not any(isinstance(existing, DemoteClientErrors) for existing in handler.filters):
            handler.addFilter(DemoteClientErrors())


demote_client_errors()


@dataclass(frozen=True)
class HubListing:
    """The hub's answer for one revision: the commit it points to (when the hub says) and every file in it."""

    commit: str | None
    files: tuple[ManifestEntry, ...]


def effective_endpoint(source: ModelSource) -> str:
    """The configured endpoint, else ModelScope's own default ($MODELSCOPE_ENDPOINT, else modelscope.cn).

    Resolved once and passed explicitly to every call, so the listing and the file downloads talk to one hub.
    """
    return source.endpoint or str(get_default_config().endpoint)


def hub_api(source: ModelSource) -> HubApi:
    token = hub_token()
    # An empty token (not None) stops the client from falling back to ~/.modelscope credentials: the environment
    # is the only place a token comes from.
    return HubApi(endpoint=effective_endpoint(source), token=token.get_secret_value() if token else "")


def fetch_listing(api: HubApi, source: ModelSource, revision: str) -> HubListing:
    """The file list at `revision` and the commit it resolves to (see `commits.head_commit`)."""
    repo_id = _require_id(source)
    if source.repo_type == "dataset":
        pages = list(_dataset_listing_pages(api, repo_id, revision))
        entries = [entry for page in pages for entry in _files_of(page)]
    else:
        pages = [_listing_page(api, f"models/{repo_id}/repo/files", {"Revision": revision, "Recursive": "True"})]
        entries = _files_of(pages[0])
        if len(entries) >= LISTING_TRUNCATION_LIMIT:
            entries = api.legacy.list_repo_files(repo_id=repo_id, repo_type="model", revision=revision, recursive=True)
    if pages[0].get("Files", []) is None:
        # How the hub answers a revision the repository does not have: success, and no file list at all.
        raise HubNotFoundError(f"{source.label}: the hub lists no files at revision '{revision}'")
    commit = revision if is_commit_id(revision) else _head_commit(api, source, revision, pages)
    return HubListing(commit=commit, files=tuple(_manifest_entries(entries)))


def _head_commit(api: HubApi, source: ModelSource, revision: str, pages: list[dict[str, Any]]) -> str | None:
    token = hub_token()
    return head_commit(
        api,
        endpoint=effective_endpoint(source),
        token=token.get_secret_value() if token else "",
        repo_type=source.repo_type,
        repo_id=_require_id(source),
        revision=revision,
        listing_pages=pages,
    )


def _dataset_listing_pages(api: HubApi, repo_id: str, revision: str) -> Iterator[dict[str, Any]]:
    page_number = 1
    while True:
        params = {"Revision": revision, "Recursive": "True", "PageNumber": page_number, "PageSize": DATASET_PAGE_SIZE}
        data = _listing_page(api, f"datasets/{repo_id}/repo/tree", params)
        yield data
        if len(_files_of(data)) < DATASET_PAGE_SIZE:
            return
        page_number += 1


def _listing_page(api: HubApi, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """One listing request through the client's own transport (auth, user agent, error mapping).

    `LegacyClient._request` is private: it is used here (and for the commit history in `commits`) because the
    client's public listing drops `LatestCommitter` and each file's `Revision`, where the hub reports commits.
    `single_attempt` because retries are ours (`with_network_retries`), with delays the pipeline controls.
    """
    response = api.legacy._request("GET", path, params=params, single_attempt=True)
    body = response.json()
    if not isinstance(body, dict):
        raise DownloadError(f"the hub answered {path} with unexpected JSON: {type(body).__name__}")
    if body.get("Success") is False or body.get("Code", 200) not in (200, "200"):
        # Some hub errors arrive with HTTP 200 and the failure only in the envelope.
        raise DownloadError(f"the hub refused {path}: Code={body.get('Code')}, {body.get('Message') or 'no message'}")
    data = body.get("Data", body)
    return data if isinstance(data, dict) else {"Files": data}


def _files_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    files = data.get("Files") or data.get("files") or []
    return [entry for entry in files if isinstance(entry, dict)]


def _manifest_entries(entries: list[dict[str, Any]]) -> Iterator[ManifestEntry]:
    for entry in entries:
        if (entry.get("Type") or entry.get("type") or "blob") == "tree":
            continue
        path = entry.get("Path") or entry.get("path") or entry.get("Name")
        if not path:
            continue
        sha256 = entry.get("Sha256") or entry.get("sha256") or None
        yield ManifestEntry(path=path, size=int(entry.get("Size") or entry.get("size") or 0), sha256=sha256)


def download_snapshot(
    source: ModelSource, revision: str, cache_dir: Path, callback_class: type[ProgressCallback] | None
) -> Path:
    """ModelScope's downloader: resumes `.incomplete` files, checks sha256, skips files already complete."""
    token = hub_token()
    directory = snapshot_download(
        repo_id=_require_id(source),
        repo_type=source.repo_type,
        revision=revision,
        cache_dir=str(cache_dir),
        allow_patterns=source.allow_patterns,
        ignore_patterns=source.ignore_patterns,
        progress_callbacks=[callback_class] if callback_class else None,
        token=token.get_secret_value() if token else "",
        endpoint=effective_endpoint(source),
    )
    return Path(directory)


def find_in_cache_only(source: ModelSource, cache_dir: Path) -> Path:
    """ModelScope's offline lookup (also finds copies made by other tools, e.g. LLaMA-Factory's container)."""
    directory = snapshot_download(
        repo_id=_require_id(source),
        repo_type=source.repo_type,
        revision=source.revision,
        cache_dir=str(cache_dir),
        local_files_only=True,
        token="",
    )
    return Path(directory)


def explain_not_found(api: HubApi, source: ModelSource) -> str | None:
    """Tell a missing repository from a missing revision: one extra request, made only after a 404."""
    kind = source.repo_type
    try:
        branches, tags = api.legacy.list_revisions_detail(_require_id(source), kind)
    except NotExistError:
        return (
            f"ModelScope has no {kind} '{source.id}' (asked for revision '{source.revision}'): check the id, "
            f"or set ${TOKEN_ENV_VAR} if it is private"
        )
    except HUB_CALL_ERRORS as error:
        log.debug("%s: could not list revisions (%s)", source.label, first_line(error))
        return None
    names = [str(item.get("Revision")) for item in [*branches, *tags]]
    return (
        f"ModelScope {kind} '{source.id}' has no revision '{source.revision}' "
        f"(its branches and tags: {', '.join(names) or 'none listed'}); use one of those or a commit id"
    )


def with_network_retries(
    action: Callable[[], T],
    *,
    what: str,
    retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `action`; after a network error wait (backoff doubling up to a minute) and try again, `retries` times.

    Anything else (404, 401, integrity) is translated at once: retrying a missing model only delays the error.
    """
    attempt = 0
    while True:
        try:
            return action()
        except HUB_CALL_ERRORS as error:
            if not is_network_error(error):
                raise translate_hub_error(error, what) from error
            if attempt >= retries:
                raise HubUnavailableError(
                    f"{what}: the hub stayed unreachable after {attempt + 1} attempts ({first_line(error)}); "
                    "partial files are kept and a new run resumes them"
                ) from error
            delay = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            attempt += 1
            log.warning(
                "%s: network error (%s); retry %d/%d in %.1f s", what, first_line(error), attempt, retries, delay
            )
            sleep(delay)


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it was raised from: ModelScope's compat layer wraps a 404 in a plain HTTPError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def failed_file_errors(error: BaseException) -> list[BaseException]:
    """The per-file errors behind a snapshot failure, or the error itself."""
    for cause in causes(error):
        if isinstance(cause, FileDownloadError) and cause.failed_files:
            return list(cause.failed_files.values())
    return [error]


def is_network_error(error: BaseException) -> bool:
    per_file = failed_file_errors(error)
    return all(_is_network_failure(item) for item in per_file)


def _is_network_failure(error: BaseException) -> bool:
    for cause in causes(error):
        if isinstance(cause, HubError):
            return isinstance(cause, _NETWORK_ERRORS)
        if isinstance(cause, requests.HTTPError):
            status = cause.response.status_code if cause.response is not None else None
            if status is not None:
                return status >= 500 or status == 429
            continue
        if isinstance(cause, _NETWORK_ERRORS):
            return True
    return False


def translate_hub_error(error: BaseException, what: str) -> DownloadError:
    """One of our errors, with a message that says what to do about it."""
    per_file = failed_file_errors(error)
    for item in per_file:
        for cause in causes(item):
            if isinstance(cause, FileIntegrityError):
                return IntegrityError(f"{what}: {first_line(cause)}; the file was discarded, not used")
    for cause in causes(error):
        if isinstance(cause, (AuthenticationError, PermissionDeniedError)):
            return HubAccessError(
                f"{what}: the hub refused access ({first_line(cause)}); a private repository needs ${TOKEN_ENV_VAR}"
            )
        if isinstance(cause, (NotExistError, InvalidParameter)):
            return HubNotFoundError(f"{what}: not found on the hub ({first_line(cause)})")
    if isinstance(error, DownloadError):
        return error
    return DownloadError(f"{what}: {first_line(error)}")


def first_line(error: BaseException) -> str:
    """The headline of an error: ModelScope's API errors append multi-line request details."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_cause_line(error: BaseException) -> str:
    """The headline of what the error was raised from last: a failed connection's own reason (`[Errno 111]
    Connection refused`) rather than the client's and urllib3's wrappings of it."""
    return first_line(list(causes(error))[-1])


def _require_id(source: ModelSource) -> str:
    if source.id is None:
        raise DownloadError("a modelscope source needs an id")
    return source.id

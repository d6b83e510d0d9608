"""A local stand-in of the ModelScope hub's HTTP API, for testing the real `modelscope` client against it.

    with HubStandIn() as hub:
        commit = hub.add_repo("qwen/Tiny", {"config.json": b"{}", "model.safetensors": weights})
        snapshot_download("qwen/Tiny", endpoint=hub.url, cache_dir=tmp)
        assert hub.file_requests("model.safetensors")

It serves the endpoints `modelscope.snapshot_download` uses (checked against modelscope 1.40 / modelscope-hub 0.5),
with the JSON envelope the real hub answers with (`{"Code": 200, "Data": ..., "Success": true}`):

    GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=   file list, LatestCommitter
    GET /api/v1/datasets/{owner}/{name}/repo/tree?Revision=&PageNumber=&PageSize=&Root=   (paginated)
    GET /api/v1/{models|datasets}/{owner}/{name}/repo?Revision=&FilePath=   file bytes, honours Range
    GET /api/v1/{models|datasets}/{owner}/{name}/revisions                  RevisionMap (branches, tags)
    GET /api/v1/{models|datasets}/{owner}/{name}/commits?Ref=&PageNumber=&PageSize=   history, newest first
    GET /api/v1/{models|datasets}/{owner}/{name}                            repository info
    GET /api/v1/repos/internalAccelerationInfo                             404 (no intra-cloud acceleration)
    GET /{models|datasets}/{owner}/{name}.git/info/refs?service=git-upload-pack   git's ref advertisement

The listing answers as modelscope.cn does, which is not what its field names promise (issue 17; a saved answer
of the real hub and independent clients of it agree):
- `LatestCommitter.Id` is empty; `LatestCommitter.ShortId` is the head commit's first 8 characters;
- each file's `Revision` is the full id of the last commit that touched that file, which may be older than the head;
- an unknown revision of a known repository is a success with `Files: null` (and no committer), not a 404.
The commit history's shape is what modelscope's `list_repo_commits` (modelscope 1.29-1.35, `CommitHistoryResponse`)
reads: `Data.Commit[]` with `Id`, `ShortId`, `Title`, `CommittedDate`, and `TotalCount` beside `Data`. The ref
advertisement is git's smart-HTTP protocol (pkt-lines; an annotated tag is followed by its peeled `^{}` line), at
the clone URL modelscope-hub builds (`{endpoint}/{type}s/{repo_id}.git`).
`disable("commits")` / `disable("git")` answer those routes with 404, as a hub without them would.

Uploads (`create_repo`, `upload_folder`) are served by tests/fakes/hub_uploads.py, for tokens given to `accept_token`.

A revision is a branch, a tag or a commit id. Unknown repositories and revisions get the hub's 404 envelope.
Faults, for resilience tests: `cut_transfer` (close the connection part-way through a file), `throttle` (serve a
file slowly), `corrupt` (serve bytes that do not match the listed sha256), `fail_all` (answer every request with a
status such as 503). Every request is logged (`requests`), including the bytes actually sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.hub_uploads import Uploads, handle_write

NOT_FOUND_CODE = 10010205001
_REPO_PATH = re.compile(r"^/api/v1/(?P<segment>models|datasets)/(?P<owner>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?$")
_GIT_REFS_PATH = re.compile(r"^/(?P<segment>models|datasets)/(?P<owner>[^/]+)/(?P<name>[^/]+)\.git/info/refs$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    authorization: str | None = None  # the Authorization header, else the Cookie (a session token travels there)
    status: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def file_path(self) -> str | None:
        """The repository file a download request asked for (None for API requests)."""
        return self.query.get("FilePath") if self.path.endswith("/repo") else None


@dataclass
class Commit:
    commit_id: str
    files: dict[str, bytes]
    created_at: int
    parent: str | None = None
    # path -> the last commit that changed the file (this one, or an ancestor): what the listing's `Revision` says
    file_revisions: dict[str, str] = field(default_factory=dict)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    unhashed: set[str] = field(default_factory=set)

    def commit_for(self, revision: str) -> Commit | None:
        commit_id = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(commit_id)

    def history(self, revision: str) -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        commits: list[Commit] = []
        current = self.commit_for(revision)
        while current is not None:
            commits.append(current)
            current = self.commits.get(current.parent) if current.parent else None
        return commits


@dataclass
class Faults:
    cut_after: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (bytes, times left)
    throttle: dict[str, float] = field(default_factory=dict)  # path -> bytes per second
    corrupt: set[str] = field(default_factory=set)
    fail_status: int | None = None
    disabled: set[str] = field(default_factory=set)  # "commits", "git": routes answered with 404


class HubStandIn:
    """A threaded HTTP server on 127.0.0.1 speaking the ModelScope hub's download API."""

    def __init__(self, port: int = 0) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults = Faults()
        self.uploads = Uploads()
        self._log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> HubStandIn:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: afterwards connections are refused."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- content ----------------------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        repo_type: str = "model",
        branch: str = "master",
        tags: tuple[str, ...] = (),
        unhashed: tuple[str, ...] = (),
    ) -> str:
        """Commit `files` as the new head of `branch` (creating the repository); returns the commit id.

        Files with the same bytes as in the branch's previous head keep that file's `Revision`: committing the same
        files again makes a head commit that no listed file carries.
        """
        key = (repo_type, repo_id)
        repo = self.repos.setdefault(key, Repo(repo_type=repo_type, repo_id=repo_id))
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        digest.update(str(len(repo.commits)).encode())
        commit_id = digest.hexdigest()
        parent = repo.commits.get(repo.branches.get(branch, ""))
        file_revisions = {
            path: parent.file_revisions[path] if parent and parent.files.get(path) == data else commit_id
            for path, data in files.items()
        }
        commit = Commit(
            commit_id=commit_id,
            files=dict(files),
            created_at=int(time.time()),
            parent=parent.commit_id if parent else None,
            file_revisions=file_revisions,
        )
        repo.commits[commit.commit_id] = commit
        repo.branches[branch] = commit.commit_id
        for tag in tags:
            repo.tags[tag] = commit.commit_id
        repo.unhashed.update(unhashed)
        return commit.commit_id

    def accept_token(self, token: str) -> None:
        """Let `token` create repositories and commit (uploads); any other token gets 401."""
        self.uploads.tokens.add(token)

    # -- faults -----------------------------------------------------------------------------------------------
    def cut_transfer(self, file_path: str, after_bytes: int, times: int = 1) -> None:
        """The next `times` downloads of `file_path` stop after `after_bytes` bytes (connection closed)."""
        self.faults.cut_after[file_path] = (after_bytes, times)

    def throttle(self, file_path: str, bytes_per_second: float) -> None:
        self.faults.throttle[file_path] = bytes_per_second

    def corrupt(self, file_path: str) -> None:
        """Serve `file_path` with one byte changed: same size, different sha256 than the listing says."""
        self.faults.corrupt.add(file_path)

    def disable(self, route: str) -> None:
        """Answer `route` ("commits": the commit history, "git": the ref advertisement) with 404 from now on."""
        self.faults.disabled.add(route)

    def fail_all(self, status: int | None) -> None:
        """Answer every request with `status` (e.g. 503), or serve normally again with None."""
        self.faults.fail_status = status

    # -- request log ------------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def file_requests(self, file_path: str | None = None) -> list[LoggedRequest]:
        return [r for r in self.requests if r.file_path is not None and (file_path is None or r.file_path == file_path)]

    def bytes_sent(self, file_path: str) -> int:
        return sum(r.bytes_sent for r in self.file_requests(file_path))

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._log.append(entry)

    def _add_sent(self, entry: LoggedRequest, count: int) -> None:
        with self._lock:
            entry.bytes_sent += count


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubRequestHandler):
        standin = hub

    return Handler


class _HubRequestHandler(BaseHTTPRequestHandler):
    standin: HubStandIn
    server_version = "hub-standin/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `standin.requests`; stderr stays quiet

    def do_HEAD(self) -> None:
        self.entry = LoggedRequest("HEAD", urlsplit(self.path).path, {}, self.headers.get("Range"))
        self.standin._record(self.entry)
        self._send_json(405, {"Code": 405, "Message": "method not allowed", "Success": False})

    def do_POST(self) -> None:
        self._write("POST")

    def do_PUT(self) -> None:
        self._write("PUT")

    def _write(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.entry = LoggedRequest(method, url.path, {}, None, self.headers.get("Authorization"))
        self.standin._record(self.entry)
        if self.standin.faults.fail_status is not None:
            status = self.standin.faults.fail_status
            self._send_json(status, {"Code": status, "Message": "stand-in failure", "Success": False})
            return
        handle_write(self, method, url.path, body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        credentials = self.headers.get("Authorization") or self.headers.get("Cookie")
        self.entry = LoggedRequest("GET", url.path, query, self.headers.get("Range"), credentials)
        self.standin._record(self.entry)
        if self.standin.faults.fail_status is not None:
            status = self.standin.faults.fail_status
            self._send_json(status, {"Code": status, "Message": "stand-in failure", "Success": False})
            return
        if url.path == "/api/v1/repos/internalAccelerationInfo":
            self._send_not_found("no intra-cloud acceleration here")
            return
        git_match = _GIT_REFS_PATH.match(url.path)
        if git_match is not None:
            repo = self.standin.repos.get((git_match["segment"][:-1], f"{git_match['owner']}/{git_match['name']}"))
            if repo is None or "git" in self.standin.faults.disabled:
                self._send_not_found(f"no repository at {url.path}")
            else:
                self._send_ref_advertisement(repo)
            return
        match = _REPO_PATH.match(url.path)
        if match is None:
            self._send_not_found(f"no route {url.path}")
            return
        repo_type = match["segment"][:-1]
        repo = self.standin.repos.get((repo_type, f"{match['owner']}/{match['name']}"))
        if repo is None:
            self._send_not_found(f"{repo_type} {match['owner']}/{match['name']} does not exist")
            return
        rest = match["rest"] or ""
        if rest == "":
            visibility = self.standin.uploads.visibility.get(repo.repo_id, 5)
            self._send_ok({"Id": 1, "Path": match["owner"], "Name": match["name"], "Visibility": visibility})
        elif rest == "/revisions":
            self._send_revisions(repo)
        elif rest in ("/repo/files", "/repo/tree"):
            self._send_listing(repo, query, paginated=rest == "/repo/tree")
        elif rest == "/repo":
            self._send_file(repo, query)
        elif rest == "/commits" and "commits" not in self.standin.faults.disabled:
            self._send_commits(repo, query)
        else:
            self._send_not_found(f"no route {url.path}")

    # -- API answers ------------------------------------------------------------------------------------------
    def _send_revisions(self, repo: Repo) -> None:
        def refs(names: dict[str, str]) -> list[dict[str, Any]]:
            return [{"Revision": name, "CreatedAt": repo.commits[c].created_at} for name, c in sorted(names.items())]

        self._send_ok({"RevisionMap": {"Branches": refs(repo.branches), "Tags": refs(repo.tags)}})

    def _send_listing(self, repo: Repo, query: dict[str, str], *, paginated: bool) -> None:
        revision = query.get("Revision", "master")
        commit = repo.commit_for(revision)
        if commit is None:
            # The hub's answer for a revision the repository does not have: success, and no files.
            self._send_ok({"Files": None, "LatestCommitter": None, "IsVisual": 0})
            return
        root = (query.get("Root") or "").strip("/")
        entries = [
            _file_entry(path, data, commit.file_revisions[path], hashed=path not in repo.unhashed)
            for path, data in sorted(commit.files.items())
            if not root or path.startswith(root + "/")
        ]
        directories = sorted({path.rsplit("/", 1)[0] for path in commit.files if "/" in path})
        entries += [_tree_entry(directory, commit.commit_id) for directory in directories]
        total = len(entries)
        if paginated:
            size = int(query.get("PageSize", 200))
            number = int(query.get("PageNumber", 1))
            entries = entries[(number - 1) * size : number * size]
        # The hub leaves `Id` empty and reports the head commit by its first 8 characters only.
        committer = {"Id": "", "ShortId": commit.commit_id[:8], "CommitterName": "stand-in", "Message": "commit"}
        self._send_ok({"Files": entries, "LatestCommitter": committer, "IsVisual": 0, "TotalCount": total})

    def _send_commits(self, repo: Repo, query: dict[str, str]) -> None:
        history = repo.history(query.get("Ref", "master"))
        size = int(query.get("PageSize", 50))
        number = int(query.get("PageNumber", 1))
        page = [
            {"Id": c.commit_id, "ShortId": c.commit_id[:8], "Title": "stand-in commit", "CommittedDate": c.created_at}
            for c in history[(number - 1) * size : number * size]
        ]
        body = {"Code": 200, "Data": {"Commit": page}, "TotalCount": len(history), "Message": "success"}
        self._send_json(200, {**body, "Success": True})

    def _send_ref_advertisement(self, repo: Repo) -> None:
        lines = [b"# service=git-upload-pack\n"]
        refs = [(f"refs/heads/{name}", commit) for name, commit in sorted(repo.branches.items())]
        head = repo.branches.get("master")
        if head:
            refs.insert(0, ("HEAD", head))
        advertised: list[bytes] = []
        for name, commit in refs:
            advertised.append(f"{commit} {name}".encode())
        for name, commit in sorted(repo.tags.items()):
            # Annotated tags: the tag object first, then the commit it points to, peeled.
            tag_object = hashlib.sha1(f"tag {name} {commit}".encode()).hexdigest()
            advertised += [f"{tag_object} refs/tags/{name}".encode(), f"{commit} refs/tags/{name}^{{}}".encode()]
        if advertised:
            advertised[0] += b"\0multi_ack side-band-64k ofs-delta symref=HEAD:refs/heads/master"
        body = _pkt_line(lines[0]) + b"0000" + b"".join(_pkt_line(line + b"\n") for line in advertised) + b"0000"
        self.entry.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.standin._add_sent(self.entry, len(body))

    def _send_file(self, repo: Repo, query: dict[str, str]) -> None:
        revision = query.get("Revision", "master")
        file_path = query.get("FilePath", "")
        commit = repo.commit_for(revision)
        if commit is None or file_path not in commit.files:
            self._send_not_found(f"file {file_path} not found at revision {revision}")
            return
        data = commit.files[file_path]
        if file_path in self.standin.faults.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end = 0, len(data) - 1
        range_match = _RANGE.match(self.headers.get("Range") or "")
        if range_match:
            start = int(range_match[1])
            end = int(range_match[2]) if range_match[2] else end
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.entry.status = 416
                return
        body = data[start : end + 1]
        self.entry.status = 206 if range_match else 200
        self.send_response(self.entry.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if range_match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        self._stream(file_path, body)

    def _stream(self, file_path: str, body: bytes) -> None:
        faults = self.standin.faults
        limit = len(body)
        cut = faults.cut_after.get(file_path)
        if cut is not None and cut[1] > 0:
            limit = min(limit, cut[0])
            faults.cut_after[file_path] = (cut[0], cut[1] - 1)
        rate = faults.throttle.get(file_path)
        chunk = 16 * 1024
        sent = 0
        try:
            while sent < limit:
                piece = body[sent : min(sent + chunk, limit)]
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                self.standin._add_sent(self.entry, len(piece))
                if rate:
                    time.sleep(len(piece) / rate)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away (killed, or gave up); the log shows how far it got
        if limit < len(body):
            # A cut transfer: the announced Content-Length is never reached, as when a connection drops.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- envelopes --------------------------------------------------------------------------------------------
    def _send_ok(self, data: Any) -> None:
        self._send_json(200, {"Code": 200, "Data": data, "Message": "success", "Success": True})

    def _send_not_found(self, message: str) -> None:
        self._send_json(404, {"Code": NOT_FOUND_CODE, "Data": None, "Message": message, "Success": False})

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps({**body, "RequestId": uuid.uuid4().hex}).encode()
        self.entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.standin._add_sent(self.entry, len(payload))


def _pkt_line(data: bytes) -> bytes:
    return f"{len(data) + 4:04x}".encode() + data


def _file_entry(path: str, data: bytes, commit_id: str, *, hashed: bool) -> dict[str, Any]:
    return {
        "Name": path.rsplit("/", 1)[-1],
        "Path": path,
        "Type": "blob",
        "Size": len(data),
        "Sha256": hashlib.sha256(data).hexdigest() if hashed else "",
        "Revision": commit_id,
        "IsLFS": len(data) > 100 * 1024,
        "Mode": "33188",
        "CommitMessage": "stand-in commit",
        "CommitterName": "stand-in",
        "CommittedDate": int(time.time()),
    }


def _tree_entry(path: str, commit_id: str) -> dict[str, Any]:
    return {"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "tree", "Size": 0, "Revision": commit_id}

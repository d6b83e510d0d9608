"""The upload side of the hub stand-in (tests/fakes/hub_standin.py): what `HubApi.create_repo` and `HubApi.upload_folder`
send (modelscope-hub 0.5, `_legacy_api.py` and `_upload.py`):

    POST /api/v1/models                                                 create (Path, Name, Visibility, License)
    POST /api/v1/repos/models/{owner}/{name}/info/lfs/objects/batch     which blobs to send, and where (href)
    PUT  {href}                                                         a blob's bytes; checked against its sha256
    POST /api/v1/repos/models/{owner}/{name}/commit/{revision}          one commit: inline (base64) and LFS files

Writes need a token given to `HubStandIn.accept_token`; anything else gets HTTP 401, as the hub answers a rejected
token (modelscope/modelscope#1620: "401 Client Error: Unauthorized"). An existing name gets the hub's "already
registered" error (code 10010101001, which the client treats as exists). The commit answer carries no data: the
client reads nothing from it, and nothing here should come to depend on a field the hub may not fill.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.hub_standin import _HubRequestHandler

ALREADY_REGISTERED_CODE = 10010101001
BLOB_PREFIX = "/lfs-upload/"
_REPO_WRITE = re.compile(
    r"^/api/v1/repos/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/(?:(?P<batch>info/lfs/objects/batch)|commit/(?P<rev>.+))$"
)


@dataclass
class Uploads:
    tokens: set[str] = field(default_factory=set)  # tokens that may write
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes, as PUT
    visibility: dict[str, int] = field(default_factory=dict)  # repo id -> Visibility it was created with
    commit_messages: dict[str, list[str]] = field(default_factory=dict)  # repo id -> messages, oldest first


def handle_write(handler: _HubRequestHandler, method: str, path: str, body: bytes) -> None:
    uploads = handler.standin.uploads
    if not _authorized(handler, uploads):
        handler._send_json(401, {"Code": 401, "Data": None, "Message": "用户未登录", "Success": False})
        return
    if method == "PUT" and path.startswith(BLOB_PREFIX):
        _store_blob(handler, uploads, path.removeprefix(BLOB_PREFIX), body)
        return
    request = json.loads(body or b"{}")
    if method == "POST" and path == "/api/v1/models":
        _create_repo(handler, uploads, request)
        return
    match = _REPO_WRITE.match(path)
    if method != "POST" or match is None:
        handler._send_not_found(f"no route {method} {path}")
        return
    repo_id = f"{match['owner']}/{match['name']}"
    if ("model", repo_id) not in handler.standin.repos:
        handler._send_not_found(f"model {repo_id} does not exist")
    elif match["batch"]:
        _answer_batch(handler, uploads, request)
    else:
        _commit(handler, uploads, repo_id, match["rev"], request)


def _authorized(handler: _HubRequestHandler, uploads: Uploads) -> bool:
    header = handler.headers.get("Authorization") or ""
    return header.startswith("Bearer ") and header.removeprefix("Bearer ") in uploads.tokens


def _create_repo(handler: _HubRequestHandler, uploads: Uploads, request: dict[str, Any]) -> None:
    from tests.fakes.hub_standin import Repo

    repo_id = f"{request['Path']}/{request['Name']}"
    if ("model", repo_id) in handler.standin.repos:
        handler._send_json(400, {"Code": ALREADY_REGISTERED_CODE, "Data": None, "Success": False,
                                 "Message": "该名称已被注册使用，请重新命名"})
        return
    handler.standin.repos[("model", repo_id)] = Repo(repo_type="model", repo_id=repo_id)
    uploads.visibility[repo_id] = int(request.get("Visibility", 5))
    handler._send_ok(None)  # the client builds its RepoInfo from the request when the hub sends no details


def _answer_batch(handler: _HubRequestHandler, uploads: Uploads, request: dict[str, Any]) -> None:
    objects = []
    for item in request.get("objects", []):
        entry = {"oid": item["oid"], "size": item["size"]}
        if item["oid"] not in uploads.blobs:  # stored ones get no action: the client skips them
            entry["actions"] = {"upload": {"href": f"{handler.standin.url}{BLOB_PREFIX}{item['oid']}"}}
        objects.append(entry)
    handler._send_ok({"objects": objects})


def _store_blob(handler: _HubRequestHandler, uploads: Uploads, oid: str, body: bytes) -> None:
    if hashlib.sha256(body).hexdigest() != oid:
        handler._send_json(400, {"Code": 400, "Data": None, "Success": False, "Message": "sha256 mismatch"})
        return
    uploads.blobs[oid] = body
    handler._send_ok(None)


def _commit(handler: _HubRequestHandler, uploads: Uploads, repo_id: str, revision: str, request: dict) -> None:
    repo = handler.standin.repos[("model", repo_id)]
    head = repo.commit_for(revision)
    files = dict(head.files) if head else {}
    for action in request.get("actions", []):
        if action["action"] == "delete":
            files.pop(action["path"], None)
        elif action["type"] == "lfs":
            if action["sha256"] not in uploads.blobs:
                handler._send_json(400, {"Code": 400, "Data": None, "Success": False,
                                         "Message": f"lfs object {action['sha256']} not uploaded"})
                return
            files[action["path"]] = uploads.blobs[action["sha256"]]
        else:
            files[action["path"]] = base64.b64decode(action["content"])
    handler.standin.add_repo(repo_id, files, branch=revision)
    uploads.commit_messages.setdefault(repo_id, []).append(request.get("commit_message", ""))
    handler._send_ok(None)

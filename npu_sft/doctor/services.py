"""The services a run reports to: the Prefect API it would use, and the MLflow tracking store of the config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from npu_sft.doctor.downloads import can_create
from npu_sft.doctor.models import Finding, ok
from npu_sft.settings import Pipeline
from npu_sft.tracking import tracking_uri

HEALTH_TIMEOUT_S = 5.0
_SQLITE = "sqlite:///"


def check_prefect() -> Finding:
    """PREFECT_API_URL as Prefect reads it (the environment, else the active profile)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if not url:
        if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return Finding("Prefect", "error", "no PREFECT_API_URL and the temporary server is disabled "
                           "(PREFECT_SERVER_EPHEMERAL_ENABLED=false): a run has no API to report to",
                           "set PREFECT_API_URL to a server (`make up` starts one), or enable the temporary server")
        return ok("Prefect", "no server configured (PREFECT_API_URL unset): `npu-sft run` starts Prefect's temporary "
                  "one; `prefect deployment run` needs `make up`'s server")
    answer = _health(f"{url.rstrip('/')}/health")
    if answer is None:
        return ok("Prefect", f"{_shown(url)} answers")
    return Finding("Prefect", "error", f"PREFECT_API_URL={_shown(url)} does not answer ({answer})",
                   "start the server (`make up`), or unset PREFECT_API_URL so that a run starts a temporary one")


def check_mlflow(pipeline: Pipeline, environ: Mapping[str, str]) -> Finding:
    uri = tracking_uri(pipeline.settings.mlflow, environ)
    key = f"{pipeline.config_file}: mlflow.tracking_uri"
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        answer = _health(f"{uri.rstrip('/')}/health")
        if answer is None:
            return ok("MLflow", f"the tracking server {_shown(uri)} answers")
        return Finding("MLflow", "error", f"the tracking server {_shown(uri)} does not answer ({answer})",
                       f"start it (`make up` starts one), or set {key} to a store this host reaches")
    if uri.startswith(_SQLITE) or scheme in ("", "file"):
        store = Path(uri[len(_SQLITE):]) if uri.startswith(_SQLITE) else Path(urlsplit(uri).path if scheme else uri)
        where = store.parent if uri.startswith(_SQLITE) else store
        if can_create(where):
            return ok("MLflow", f"local store {uri}")
        return Finding("MLflow", "error", f"local store {uri}: {where} can not be written",
                       f"set {key} to a place this user may write")
    return Finding("MLflow", "warning", f"a {scheme} store ({_shown(uri)}): not checked from here", "")


def _health(url: str) -> str | None:
    """None when `url` answers 200, else what went wrong."""
    try:
        response = httpx.get(url, timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def _shown(url: str) -> str:
    """`url` without credentials, which a tracking or API URL may carry."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}{f':{parts.port}' if parts.port else ''}"))

"""Install the datasources, the "meshlens" folder and the dashboards through Grafana's HTTP API (grafana-client).

Idempotent: every object has a fixed uid, so a second run updates in place
(datasources by uid, the folder by uid, dashboards with overwrite) and never
duplicates. Checked first, so that failures are one clear line:

- Grafana reachable (GET /api/health);
- the credentials work (GET /api/org: 401 bad credentials, 403 not allowed);
- the ClickHouse plugin is installed (GET /api/plugins/grafana-clickhouse-datasource/settings,
  404 when it is not). This check matters because Grafana itself does not refuse
  a datasource of an unknown type: POST /api/datasources answers 200
  "Datasource added" (pkg/api/datasources.go AddDataSource validates the URL and
  jsonData, never the plugin), and every panel then fails to load.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from meshlens.dashboards.datasources import (ClickHouseTarget, Names, ProvisionError, clickhouse_datasource,
                                    installed_dashboards, prometheus_datasource)
from meshlens.dashboards.model import CLICKHOUSE_PLUGIN

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
INSTALL_HINT = (f"install it (grafana cli plugins install {CLICKHOUSE_PLUGIN}, or "
                f"GF_INSTALL_PLUGINS={CLICKHOUSE_PLUGIN} for the container) and restart Grafana")


@dataclass
class Report:
    """What a run did to each object: 'created' or 'updated', by kind and uid."""

    actions: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, uid: str, action: str) -> None:
        self.actions.append((kind, uid, action))

    def lines(self) -> list[str]:
        return [f"{action} {kind} {uid}" for kind, uid, action in self.actions]


def connect(url: str, token: str | None = None, user: str | None = None, password: str | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> GrafanaApi:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProvisionError(f"--grafana-url must be http(s)://HOST[:PORT][/PATH], got {url!r}")
    credential: str | tuple[str, str] | None = token or ((user, password or "") if user else None)
    if credential is None and parts.username:
        credential = (parts.username, parts.password or "")
    base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
    return GrafanaApi.from_url(base, credential=credential, timeout=timeout)


class Session:
    """One Grafana, its answers turned into ProvisionError lines naming what was being done."""

    def __init__(self, api: GrafanaApi, url: str) -> None:
        self.api, self.url = api, url

    def call(self, what: str, fn: Callable[[], T], missing_ok: bool = False) -> T | None:
        try:
            return fn()
        except GrafanaException as e:
            status = e.status_code
            if missing_ok and status == 404:
                return None
            if status == 401:
                raise ProvisionError(f"Grafana at {self.url} refused the credentials (401): check --token, or "
                                     "--user and --password") from None
            if status == 403:
                raise ProvisionError(f"Grafana at {self.url} does not allow {what} (403): use a token or user "
                                     "with the Admin role") from None
            if status == 0:
                raise ProvisionError(f"cannot reach Grafana at {self.url}: {_reason(e.message)}") from None
            raise ProvisionError(f"Grafana at {self.url} answered {status} to {what}: "
                                 f"{_first_line(_message(e))}") from None
        except OSError as e:  # connection refused, DNS, TLS: niquests' errors are OSErrors
            raise ProvisionError(f"cannot reach Grafana at {self.url}: {_reason(str(e))}") from None

    def get(self, what: str, path: str, missing_ok: bool = False) -> Any:
        return self.call(what, lambda: self.api.client.GET(path), missing_ok)


def _message(e: GrafanaException) -> str:
    if isinstance(e.response, dict) and e.response.get("message"):
        return str(e.response["message"])
    if not isinstance(e.response, dict) and "<!doctype html" in (e.message or "").lower():
        # Grafana's API answers JSON; a web page means another server, or a path in front of the API
        return "a web page, not Grafana's API (is --grafana-url Grafana's own address, without /api?)"
    return e.message


def _reason(text: str) -> str:
    """The OS's words from a connection error ('Connection refused'), else its first line."""
    text = text or ""
    m = re.search(r"Failed to resolve '([^']+)'", text)
    if m:
        return f"cannot resolve host {m.group(1)}"
    if "timed out" in text.lower():
        return "timed out"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return m.group(1).strip() if m else _first_line(text)


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else "no answer"


def check(s: Session) -> str:
    """Reachable, signed in, plugin installed; returns Grafana's version."""
    health = s.get("the health check", "/health") or {}
    s.get("reading the current organization", "/org")
    if s.get("reading the ClickHouse plugin's settings", f"/plugins/{CLICKHOUSE_PLUGIN}/settings",
             missing_ok=True) is None:
        raise ProvisionError(f"Grafana at {s.url} has no ClickHouse plugin ({CLICKHOUSE_PLUGIN}): {INSTALL_HINT}")
    return str(health.get("version", "")) if isinstance(health, dict) else ""


def upsert_datasource(s: Session, body: dict[str, Any], report: Report) -> None:
    uid = body["uid"]
    found = s.call(f"reading datasource {uid}", lambda: s.api.datasource.get_datasource_by_uid(uid), missing_ok=True)
    if found is None:
        try:
            s.call(f"creating datasource {uid}", lambda: s.api.datasource.create_datasource(body))
        except ProvisionError as e:
            if " 409 " in str(e):
                raise ProvisionError(f"Grafana at {s.url} already has a datasource named {body['name']!r} with "
                                     "another uid: rename it, or pass --datasource-name") from None
            raise
        report.add("datasource", uid, "created")
    else:
        s.call(f"updating datasource {uid}", lambda: s.api.datasource.update_datasource_by_uid(uid, body))
        report.add("datasource", uid, "updated")


def ensure_folder(s: Session, names: Names, report: Report) -> None:
    uid = names.folder_uid
    if s.call(f"reading folder {uid}", lambda: s.api.folder.get_folder(uid), missing_ok=True) is None:
        s.call(f"creating folder {uid}", lambda: s.api.folder.create_folder(names.folder_title, uid=uid))
        report.add("folder", uid, "created")
    else:
        report.add("folder", uid, "kept")


def put_dashboards(s: Session, dashboards: dict[str, dict[str, Any]], folder_uid: str, report: Report) -> None:
    for uid, dash in dashboards.items():
        existed = s.call(f"reading dashboard {uid}", lambda: s.api.dashboard.get_dashboard(uid), missing_ok=True)
        body = {"dashboard": dash, "folderUid": folder_uid, "overwrite": True,
                "message": "meshlens dashboards provision"}
        s.call(f"saving dashboard {uid}", lambda: s.api.dashboard.update_dashboard(body))
        report.add("dashboard", uid, "created" if existed is None else "updated")


def provision(api: GrafanaApi, url: str, ch: ClickHouseTarget, names: Names = Names(),
              prometheus_url: str | None = None) -> Report:
    """Check Grafana, then create or update the datasource(s), the folder and every dashboard."""
    s = Session(api, url)
    report = Report()
    version = check(s)
    log.info("grafana ready url=%s version=%s", url, version or "?")
    upsert_datasource(s, clickhouse_datasource(ch, names), report)
    if prometheus_url:
        upsert_datasource(s, prometheus_datasource(prometheus_url, names), report)
    ensure_folder(s, names, report)
    put_dashboards(s, installed_dashboards(ch, names, prometheus_url is not None), names.folder_uid, report)
    return report

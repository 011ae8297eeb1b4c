"""The Grafana datasources meshlens needs, and the dashboards as they are installed: one place for both the
HTTP API (dashboards/provision.py) and file provisioning (write_files).

The ClickHouse datasource points at a ClickHouse server (native or HTTP) or at
the collector's query endpoint over the embedded store (protocol http); its
settings are the plugin's jsonData (src/types/config.ts: host, port, protocol,
secure, path, username, defaultDatabase, traces.*) with the password in
secureJsonData.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlens.collector.stores import StoreURLError, parse_store_url
from meshlens.dashboards import load_all
from meshlens.dashboards.model import CLICKHOUSE_PLUGIN, DEFAULT_DATASOURCE_NAME, DEFAULT_DATASOURCE_UID

PROMETHEUS_UID = "meshlens-prometheus"
PROMETHEUS_NAME = "meshlens Prometheus"
FOLDER_UID = "meshlens"
FOLDER_TITLE = "meshlens"


class ProvisionError(Exception):
    """Provisioning cannot go on; the message is one line that says what to do."""


@dataclass(frozen=True, slots=True)
class ClickHouseTarget:
    """Where Grafana's ClickHouse datasource connects, from a store URL."""

    protocol: str  # "http" or "native", the plugin's names
    host: str
    port: int
    secure: bool
    username: str
    password: str
    database: str
    path: str

    @classmethod
    def from_url(cls, url: str) -> ClickHouseTarget:
        try:
            p = parse_store_url(url)
        except StoreURLError as e:
            raise ProvisionError(str(e)) from None
        if p["scheme"] == "chdb":
            raise ProvisionError("Grafana cannot open an embedded store directly: point --clickhouse-url at the "
                                 "collector's query endpoint (http://HOST:8123/) or a ClickHouse server")
        return cls("native" if p["scheme"] == "native" else "http", p["host"], int(p["port"]), bool(p["secure"]),
                   p["user"], p["password"], p["database"], "" if p["path"] in ("", "/") else p["path"])


@dataclass(frozen=True, slots=True)
class Names:
    """The uids and names provisioning creates; fixed uids make a second run update, not duplicate."""

    datasource_uid: str = DEFAULT_DATASOURCE_UID
    datasource_name: str = DEFAULT_DATASOURCE_NAME
    prometheus_uid: str = PROMETHEUS_UID
    prometheus_name: str = PROMETHEUS_NAME
    folder_uid: str = FOLDER_UID
    folder_title: str = FOLDER_TITLE


def clickhouse_datasource(ch: ClickHouseTarget, names: Names = Names()) -> dict[str, Any]:
    json_data: dict[str, Any] = {
        "host": ch.host, "port": ch.port, "protocol": ch.protocol, "secure": ch.secure,
        "username": ch.username or "default", "defaultDatabase": ch.database,
        "traces": {"defaultDatabase": ch.database, "defaultTable": "otel_traces", "otelEnabled": True,
                   "otelVersion": "latest"},
    }
    if ch.path:
        json_data["path"] = ch.path
    body: dict[str, Any] = {"uid": names.datasource_uid, "name": names.datasource_name, "type": CLICKHOUSE_PLUGIN,
                            "access": "proxy", "isDefault": False, "jsonData": json_data}
    if ch.password:
        body["secureJsonData"] = {"password": ch.password}
    return body


def prometheus_datasource(url: str, names: Names = Names()) -> dict[str, Any]:
    return {"uid": names.prometheus_uid, "name": names.prometheus_name, "type": "prometheus", "access": "proxy",
            "url": url, "isDefault": False, "jsonData": {"httpMethod": "POST"}}


def installed_dashboards(ch: ClickHouseTarget, names: Names = Names(),
                         prometheus: bool = False) -> dict[str, dict[str, Any]]:
    """The committed dashboards with the database constant and default datasources set for this install."""
    out = {}
    for uid, dash in load_all().items():
        d = copy.deepcopy(dash)
        for v in d["templating"]["list"]:
            if v["name"] == "database" and v["type"] == "constant":
                v["query"] = ch.database
                v["current"] = {"selected": False, "text": ch.database, "value": ch.database}
                v["options"] = [{"selected": True, "text": ch.database, "value": ch.database}]
            elif v["type"] == "datasource" and v["query"] == CLICKHOUSE_PLUGIN:
                v["current"] = {"selected": True, "text": names.datasource_name, "value": names.datasource_uid}
            elif v["type"] == "datasource" and v["query"] == "prometheus" and prometheus:
                v["current"] = {"selected": True, "text": names.prometheus_name, "value": names.prometheus_uid}
        out[uid] = d
    return out


def write_files(directory: Path, ch: ClickHouseTarget, names: Names = Names(), prometheus_url: str | None = None,
                json_path: str | None = None) -> list[Path]:
    """Grafana file provisioning under `directory`: datasources/meshlens.yaml, dashboards/meshlens.yaml and the
    dashboards' JSON (dashboards/meshlens/*.json); the provider reads `json_path` (where Grafana sees that
    JSON directory; default: its absolute path here)."""
    import yaml

    try:
        json_dir = directory / "dashboards" / "meshlens"
        json_dir.mkdir(parents=True, exist_ok=True)
        (directory / "datasources").mkdir(parents=True, exist_ok=True)
        written = []
        for uid, dash in installed_dashboards(ch, names, prometheus_url is not None).items():
            path = json_dir / f"{uid}.json"
            path.write_text(json.dumps(dash, indent=2) + "\n")
            written.append(path)
        datasources = [clickhouse_datasource(ch, names)]
        if prometheus_url:
            datasources.append(prometheus_datasource(prometheus_url, names))
        for ds in datasources:
            ds["editable"] = True
        ds_file = directory / "datasources" / "meshlens.yaml"
        ds_file.write_text(yaml.safe_dump({"apiVersion": 1, "datasources": datasources}, sort_keys=False))
        provider = {"name": "meshlens", "orgId": 1, "folder": names.folder_title, "folderUid": names.folder_uid,
                    "type": "file", "disableDeletion": False, "allowUiUpdates": False, "updateIntervalSeconds": 30,
                    "options": {"path": json_path or str(json_dir.resolve()), "foldersFromFilesStructure": False}}
        db_file = directory / "dashboards" / "meshlens.yaml"
        db_file.write_text(yaml.safe_dump({"apiVersion": 1, "providers": [provider]}, sort_keys=False))
    except OSError as e:
        raise ProvisionError(f"cannot write provisioning files under {directory}: {e.strerror or e}") from None
    return [ds_file, db_file, *written]

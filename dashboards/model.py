"""Building blocks of a Grafana dashboard as plain dicts: datasources, variables, targets, panels, layout.

Field names and values follow what Grafana (schemaVersion 42) and the
ClickHouse datasource plugin (`grafana-clickhouse-datasource`, v4) write in
their own dashboards: a target carries `editorType: "sql"`, `rawSql` and the
query editor's `format` number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 42  # what Grafana 12 writes (apps/dashboard/.../schemaversion LATEST_VERSION)
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
CLICKHOUSE = {"type": CLICKHOUSE_PLUGIN, "uid": "${datasource}"}
PROMETHEUS = {"type": "prometheus", "uid": "${prometheus}"}
# The plugin's query editor formats.
FORMAT_TIME_SERIES, FORMAT_TABLE, FORMAT_LOGS, FORMAT_TRACE = 0, 1, 2, 3
QUERY_TYPE = {FORMAT_TIME_SERIES: "timeseries", FORMAT_TABLE: "table", FORMAT_LOGS: "logs", FORMAT_TRACE: "traces"}
# Panel type -> formats its ClickHouse targets may use.
PANEL_FORMATS: dict[str, frozenset[int]] = {
    "timeseries": frozenset({FORMAT_TIME_SERIES}),
    "heatmap": frozenset({FORMAT_TIME_SERIES}),
    "table": frozenset({FORMAT_TABLE}),
    "stat": frozenset({FORMAT_TABLE, FORMAT_TIME_SERIES}),
    "barchart": frozenset({FORMAT_TABLE}),
    "piechart": frozenset({FORMAT_TABLE}),
    "nodeGraph": frozenset({FORMAT_TABLE}),
    "traces": frozenset({FORMAT_TRACE}),
    "logs": frozenset({FORMAT_LOGS}),
}
GRID_WIDTH = 24

DEFAULT_DATASOURCE_UID = "meshlens-clickhouse"
DEFAULT_DATASOURCE_NAME = "meshlens ClickHouse"
DEFAULT_DATABASE = "meshlens"


# --- variables -----------------------------------------------------------------------

def datasource_var(name: str, plugin: str, label: str, current_uid: str = "") -> dict[str, Any]:
    current = {"selected": True, "text": current_uid, "value": current_uid} if current_uid else {}
    return {"type": "datasource", "name": name, "label": label, "query": plugin, "current": current,
            "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
            "skipUrlSync": False}


def clickhouse_datasource_var() -> dict[str, Any]:
    return datasource_var("datasource", CLICKHOUSE_PLUGIN, "ClickHouse", DEFAULT_DATASOURCE_UID)


def database_var(database: str = DEFAULT_DATABASE) -> dict[str, Any]:
    """The database holding calls and otel_traces; a constant provisioning may rewrite."""
    return {"type": "constant", "name": "database", "label": "Database", "query": database, "hide": 2,
            "current": {"selected": False, "text": database, "value": database},
            "options": [{"selected": True, "text": database, "value": database}], "skipUrlSync": False}


def query_var(name: str, label: str, sql: str, *, multi: bool = False, include_all: bool = False,
              datasource: dict[str, str] = CLICKHOUSE) -> dict[str, Any]:
    """A variable whose values come from a ClickHouse query (first column), refreshed on time range change."""
    current: dict[str, Any] = ({"selected": True, "text": ["All"], "value": ["$__all"]} if include_all and multi
                               else {})
    out: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": dict(datasource),
        "definition": sql, "query": {"editorType": "sql", "format": FORMAT_TABLE, "rawSql": sql},
        "current": current, "hide": 0, "multi": multi, "includeAll": include_all, "options": [],
        "refresh": 2, "regex": "", "sort": 1, "skipUrlSync": False,
    }
    if include_all:
        out["allValue"] = None
    return out


def custom_var(name: str, label: str, values: list[str], default: str, description: str = "") -> dict[str, Any]:
    return {"type": "custom", "name": name, "label": label, "description": description,
            "query": ",".join(values), "hide": 0, "multi": False, "includeAll": False,
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": v == default, "text": v, "value": v} for v in values], "skipUrlSync": False}


# --- targets -------------------------------------------------------------------------

def sql_target(sql: str, fmt: int, ref: str = "A") -> dict[str, Any]:
    return {"datasource": dict(CLICKHOUSE), "editorType": "sql", "format": fmt, "queryType": QUERY_TYPE[fmt],
            "rawSql": sql.strip(), "refId": ref}


def sql_annotation(name: str, sql: str, color: str) -> dict[str, Any]:
    """An annotation query on the ClickHouse datasource, in the plugin's shape (a SQL target, table format).

    Grafana maps its result by column name (standardAnnotationSupport): `time`, `title`, `text`, and `tags`,
    which it splits on commas."""
    return {"datasource": dict(CLICKHOUSE), "enable": True, "hide": False, "iconColor": color, "name": name,
            "target": sql_target(sql, FORMAT_TABLE, "annotation")}


def prom_target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": dict(PROMETHEUS), "editorMode": "code", "expr": expr, "legendFormat": legend or "__auto",
            "range": True, "refId": ref}


# --- panels --------------------------------------------------------------------------

PanelType = Literal["timeseries", "heatmap", "table", "stat", "barchart", "piechart", "nodeGraph", "traces", "text"]


@dataclass
class Panel:
    """One panel before layout: its kind, queries and look; `w`/`h` in grid units."""

    title: str
    type: PanelType
    targets: list[dict[str, Any]]
    description: str = ""
    w: int = 12
    h: int = 8
    unit: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)

    def datasource(self) -> dict[str, str]:
        return dict(self.targets[0]["datasource"])

    def render(self, pid: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        if self.unit:
            defaults["unit"] = self.unit
        if self.custom:
            defaults["custom"] = self.custom
        if self.links:
            defaults["links"] = self.links
        return {"id": pid, "type": self.type, "title": self.title, "description": self.description,
                "datasource": self.datasource(), "gridPos": {"h": self.h, "w": self.w, "x": x, "y": y},
                "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
                "options": self.options, "targets": self.targets}


@dataclass
class Row:
    """A row header; panels after it until the next row belong to it."""

    title: str


def override(field_name: str, **props: Any) -> dict[str, Any]:
    """A by-name field override, e.g. override('p99 ms', unit='ms')."""
    return {"matcher": {"id": "byName", "options": field_name},
            "properties": [{"id": k.replace("_", "."), "value": v} for k, v in props.items()]}


def layout(items: list[Panel | Row]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at the grid width; ids in order from 1."""
    out: list[dict[str, Any]] = []
    x = y = row_h = 0
    for pid, item in enumerate(items, start=1):
        if isinstance(item, Row):
            y += row_h
            out.append({"id": pid, "type": "row", "title": item.title, "collapsed": False, "panels": [],
                        "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}})
            x, y, row_h = 0, y + 1, 0
            continue
        if x + item.w > GRID_WIDTH:
            x, y, row_h = 0, y + row_h, 0
        out.append(item.render(pid, x, y))
        x += item.w
        row_h = max(row_h, item.h)
    return out


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
              items: list[Panel | Row], *, tags: tuple[str, ...] = (), time_from: str = "now-1h",
              links: list[dict[str, Any]] | None = None,
              annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole dashboard; `annotations` are shown after Grafana's own (alerts and hand-made ones)."""
    return {
        "uid": uid, "title": title, "description": description, "tags": ["meshlens", *tags],
        "editable": True, "graphTooltip": 1, "id": None, "fiscalYearStartMonth": 0, "liveNow": False,
        "refresh": "30s", "schemaVersion": SCHEMA_VERSION, "time": {"from": time_from, "to": "now"},
        "timepicker": {}, "timezone": "utc", "version": 1, "weekStart": "",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"},
                                 *(annotations or [])]},
        "links": links if links is not None else [
            {"asDropdown": True, "icon": "external link", "includeVars": False, "keepTime": True,
             "tags": ["meshlens"], "title": "meshlens", "type": "dashboards"}],
        "templating": {"list": variables},
        "panels": layout(items),
    }

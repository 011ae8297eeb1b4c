"""Run dashboards the way Grafana would: resolve variables by running their queries, expand, query the store."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from meshlens.collector.stores import Store
from tests.dashboards.macros import ALL, TimeRange, Variable, expand

MAX_DATA_POINTS = 200  # Grafana's interval = range / max data points, here for a wide panel


@dataclass
class Target:
    dashboard: str
    panel: dict[str, Any]
    target: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.dashboard}:{self.panel['title']}:{self.target['refId']}"


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def clickhouse_targets(dashboards: dict[str, dict[str, Any]]) -> list[Target]:
    return [Target(uid, p, t) for uid, d in dashboards.items() for p in panels(d) for t in p.get("targets", [])
            if t["datasource"]["type"] == "grafana-clickhouse-datasource"]


def time_range(store: Store, database: str = "meshlens") -> TimeRange:
    """The data's extent plus a minute each side, with Grafana's interval for it."""
    lo, hi = store.query_rows(f"SELECT toUnixTimestamp64Milli(min(time)), toUnixTimestamp64Milli(max(time)) "
                              f"FROM {database}.calls")[0]
    lo, hi = int(lo) - 60_000, int(hi) + 60_000
    return TimeRange(lo, hi, max((hi - lo) // MAX_DATA_POINTS, 1))


def run(store: Store, sql: str, variables: dict[str, Variable], tr: TimeRange) -> pa.Table:
    return store.query_arrow(expand(sql, variables, tr))


def describe(store: Store, sql: str) -> dict[str, str]:
    """Column name -> ClickHouse type of a query's result."""
    return {r[0]: r[1] for r in store.query_rows(f"DESCRIBE ({sql})")}


def analysis_scope(store: Store, tr: TimeRange) -> Any:
    """analysis' Scope over the panels' time range (whole seconds, as $__timeFilter has it)."""
    from datetime import datetime, timezone

    from meshlens.analysis.scope import open_scope
    from meshlens.analysis.window import Window

    return open_scope(store, Window(datetime.fromtimestamp(tr.from_ms // 1000, timezone.utc),
                                    datetime.fromtimestamp(tr.to_ms // 1000 + 1, timezone.utc)))


def resolve_variables(store: Store, dash: dict[str, Any], tr: TimeRange,
                      pick: dict[str, str] | None = None) -> dict[str, Variable]:
    """Each variable's current value, in order, as Grafana resolves them on load.

    A query variable runs its SQL (with the variables before it) and takes the
    first value, `pick[name]` when given, or All for a multi-value one with an All option.
    """
    out: dict[str, Variable] = {}
    for v in dash["templating"]["list"]:
        name, kind = v["name"], v["type"]
        if kind == "datasource":
            continue
        if kind in ("constant", "custom"):
            opts = [o["value"] for o in v.get("options", [])]
            out[name] = Variable(name, v["current"]["value"], opts)
        elif kind == "query":
            values = [str(r) for r in run(store, v["query"]["rawSql"], out, tr).column(0).to_pylist()]
            if not values:
                raise AssertionError(f"variable {name} of {dash['uid']} has no values")
            if pick and name in pick:
                chosen: str | list[str] = pick[name]
            elif v.get("includeAll") and v.get("multi"):
                chosen = [ALL]
            else:
                chosen = [values[0]] if v.get("multi") else values[0]
            out[name] = Variable(name, chosen, [ALL, *values] if v.get("includeAll") else values,
                                 all_value=v.get("allValue"))
        else:
            raise AssertionError(f"variable type {kind} not handled")
    return out

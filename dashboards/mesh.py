"""The traffic dashboards over `calls`: mesh overview, service detail, edge detail (these two marked with the
control plane's changes to the service, or to the callee: dashboards/annotations.py)."""
from __future__ import annotations

from typing import Any

from meshlens.dashboards.annotations import change_annotations
from meshlens.dashboards.model import (FORMAT_TABLE, FORMAT_TIME_SERIES, Panel, Row, clickhouse_datasource_var,
                              custom_var, dashboard, database_var, override, query_var, sql_target)
from meshlens.dashboards.sql import (BUCKET, CALLEE, CALLER, CALLER_SIDE, CALLS, FAILED, MS, PER_SECOND, ROUTE, SERVICE_SIDE,
                            WINDOW, error_ratio, observer_rule, quantile_ms, scope, services_filter)

OBSERVERS = ["auto", "client", "server", "wire", "otlp"]
OBSERVER_HELP = ("auto: one observer per caller -> callee edge (the caller's sidecar where present, else the "
                 "callee's, else the tap, else spans), as analysis does; or exactly one observer's rows")
# Latency heatmap buckets, upper bounds in ms (the last one open).
HEATMAP_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
WINDOW_SECONDS = "greatest(1, dateDiff('second', ($__fromTime), ($__toTime)))"
STATUS_CLASS = ("multiIf(error != '', concat('error: ', toString(error)), status = 0, 'no response', "
                "concat(toString(intDiv(status, 100)), 'xx'))")
TRACE_LINK = [{"title": "Open trace",
               "url": "/d/meshlens-traces/traces?var-trace_id=${__value.raw}&${__url_time_range}"}]
SERVICE_LINK = [{"title": "Service detail",
                 "url": "/d/meshlens-service/service-detail?var-service=${__value.raw}&${__url_time_range}"}]
EDGE_LINK = [{"title": "Edge detail", "url": "/d/meshlens-edge/edge-detail?var-src=${__data.fields.caller}"
                                            "&var-dst=${__data.fields.callee}&${__url_time_range}"}]


def observer_var() -> dict[str, Any]:
    return custom_var("observer", "Observer", OBSERVERS, "auto", OBSERVER_HELP)


def ts(title: str, sql: str, unit: str = "", description: str = "", w: int = 12, stack: bool = False) -> Panel:
    custom = {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "showPoints": "never", "spanNulls": False,
              "stacking": {"group": "A", "mode": "normal" if stack else "none"}}
    return Panel(title, "timeseries", [sql_target(sql, FORMAT_TIME_SERIES)], description, w=w, unit=unit,
                 custom=custom, options={"legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                                                    "calcs": ["mean", "max"]},
                                         "tooltip": {"mode": "multi", "sort": "desc"}})


def table(title: str, sql: str, description: str = "", w: int = 12, h: int = 8,
          overrides: list[dict[str, Any]] | None = None) -> Panel:
    return Panel(title, "table", [sql_target(sql, FORMAT_TABLE)], description, w=w, h=h,
                 overrides=overrides or [], options={"showHeader": True, "cellHeight": "sm",
                                                     "footer": {"show": False, "reducer": ["sum"], "fields": ""}})


def stat(title: str, sql: str, unit: str = "", description: str = "", w: int = 6, fields: str = "",
         overrides: list[dict[str, Any]] | None = None) -> Panel:
    return Panel(title, "stat", [sql_target(sql, FORMAT_TABLE)], description, w=w, h=4, unit=unit,
                 overrides=overrides or [],
                 options={"reduceOptions": {"values": False, "calcs": ["lastNotNull"], "fields": fields},
                          "textMode": "value_and_name", "colorMode": "value", "graphMode": "none",
                          "justifyMode": "auto", "orientation": "auto"})


def red_columns(prefix: str = "") -> str:
    """calls, rate, error ratio and latency quantiles over the group."""
    return (f"count() AS {prefix}calls, round(count() / {WINDOW_SECONDS}, 3) AS {prefix}rps, "
            f"{error_ratio()} AS {prefix}error_ratio, {quantile_ms(0.5)} AS p50_ms, "
            f"{quantile_ms(0.95)} AS p95_ms, {quantile_ms(0.99)} AS p99_ms")


RED_OVERRIDES = [override("error_ratio", unit="percentunit"), override("p50_ms", unit="ms"),
                 override("p95_ms", unit="ms"), override("p99_ms", unit="ms"), override("rps", unit="reqps")]


# --- mesh overview --------------------------------------------------------------------

def overview() -> dict[str, Any]:
    svc = services_filter()
    where = scope(svc)
    either = scope(f"({services_filter('dst_service')} OR {services_filter('src_service')})")
    items: list[Panel | Row] = [
        Row("RED per service (one observer per edge)"),
        ts("Requests per second by service", f"""
SELECT {BUCKET} AS time, {CALLEE} AS service, count() / {PER_SECOND} AS rps
FROM {CALLS} WHERE {where}
GROUP BY time, service ORDER BY time""", unit="reqps", w=8),
        ts("Failure ratio by service", f"""
SELECT {BUCKET} AS time, {CALLEE} AS service, countIf({FAILED}) / count() AS failure_ratio
FROM {CALLS} WHERE {where}
GROUP BY time, service ORDER BY time""", unit="percentunit", w=8,
           description="Calls with no response (an error class) or a 5xx, over all calls."),
        ts("p95 latency by service", f"""
SELECT {BUCKET} AS time, {CALLEE} AS service, quantile(0.95)({MS}) AS p95_ms
FROM {CALLS} WHERE {where}
GROUP BY time, service ORDER BY time""", unit="ms", w=8),
        table("Services", f"""
SELECT {CALLEE} AS service, {red_columns()}
FROM {CALLS} WHERE {where}
GROUP BY service ORDER BY calls DESC""", w=24, overrides=RED_OVERRIDES + [override("service", links=SERVICE_LINK)]),
        Row("Edges"),
        Panel("Service graph", "nodeGraph", [
            sql_target(f"""
SELECT name AS id, name AS title, sum(n) AS mainstat, if(sum(n) = 0, 0, sum(f) / sum(n)) AS arc__failed,
       1 - arc__failed AS arc__ok
FROM (SELECT {CALLEE} AS name, count() AS n, countIf({FAILED}) AS f FROM {CALLS} WHERE {either} GROUP BY name
      UNION ALL
      SELECT {CALLER} AS name, 0 AS n, 0 AS f FROM {CALLS} WHERE {either} GROUP BY name)
GROUP BY name""", FORMAT_TABLE, "nodes"),
            sql_target(f"""
SELECT concat({CALLER}, ' -> ', {CALLEE}) AS id, {CALLER} AS source, {CALLEE} AS target,
       count() AS mainstat, {error_ratio()} AS secondarystat
FROM {CALLS} WHERE {either}
GROUP BY source, target""", FORMAT_TABLE, "edges"),
        ], "Callers and callees; node arcs show the failure share of calls to the node.", w=12, h=12,
            overrides=[override("arc__failed", color={"mode": "fixed", "fixedColor": "red"}),
                       override("arc__ok", color={"mode": "fixed", "fixedColor": "green"})]),
        table("Top edges", f"""
SELECT {CALLER} AS caller, {CALLEE} AS callee, any(toString(observer)) AS observer_used, {red_columns()},
       round(countIf(tls) / count(), 4) AS tls_share
FROM {CALLS} WHERE {either}
GROUP BY caller, callee ORDER BY calls DESC LIMIT 20""", w=12, h=12,
              overrides=RED_OVERRIDES + [override("tls_share", unit="percentunit"),
                                         override("callee", links=EDGE_LINK)]),
        Row("Where it fails, how it travels"),
        table("Error hot spots", f"""
SELECT {CALLEE} AS callee, toString(method) AS method, {ROUTE} AS route, {STATUS_CLASS} AS failure,
       count() AS failures, any(trace_id) AS example_trace
FROM {CALLS} WHERE {where} AND {FAILED}
GROUP BY callee, method, route, failure ORDER BY failures DESC LIMIT 20""", w=12,
              description="The callee, route and failure class with the most failed calls.",
              overrides=[override("example_trace", links=TRACE_LINK)]),
        Panel("Traffic by protocol", "piechart", [sql_target(f"""
SELECT toString(protocol) AS protocol, count() AS calls
FROM {CALLS} WHERE {where}
GROUP BY protocol ORDER BY calls DESC""", FORMAT_TABLE)], w=6,
              options={"reduceOptions": {"values": True, "calcs": ["lastNotNull"], "fields": ""},
                       "pieType": "donut", "legend": {"displayMode": "list", "placement": "bottom",
                                                      "showLegend": True}}),
        ts("TLS vs plaintext", f"""
SELECT {BUCKET} AS time, if(tls, 'TLS', 'plaintext') AS transport, count() / {PER_SECOND} AS rps
FROM {CALLS} WHERE {where}
GROUP BY time, transport ORDER BY time""", unit="reqps", w=6, stack=True),
    ]
    return dashboard("meshlens-overview", "meshlens / Mesh overview",
                     "Rate, failures and latency per service, the busiest edges, where calls fail, protocols and TLS.",
                     [clickhouse_datasource_var(), database_var(), _services_var(), observer_var()], items)


def _services_var() -> dict[str, Any]:
    return query_var("service", "Service", f"""
SELECT DISTINCT {CALLEE} AS service FROM {CALLS} WHERE {WINDOW} ORDER BY service""".strip(),
                     multi=True, include_all=True)


# --- service detail -------------------------------------------------------------------

def service() -> dict[str, Any]:
    to_me = scope("dst_service = '${service}'", prefer=SERVICE_SIDE)
    callers = scope("dst_service = '${service}'", prefer=CALLER_SIDE)
    from_me = scope("src_service = '${service}'", prefer=CALLER_SIDE)
    heat = ", ".join(_heat_bucket(i) for i in range(len(HEATMAP_BUCKETS_MS) + 1))
    items: list[Panel | Row] = [
        Row("${service}"),
        stat("Mode in force", f"""
SELECT if(countIf(mode != '') = 0, '(no sidecar)', argMaxIf(toString(mode), time, mode != '')) AS mode
FROM {CALLS} WHERE {WINDOW} AND dst_service = '${{service}}'""",
             fields="/^mode$/", description="The mode a sidecar recorded on the latest call to the service "
                                            "(the tap and spans do not know it)."),
        stat("Calls", f"""
SELECT round(count() / {WINDOW_SECONDS}, 3) AS rps, {error_ratio()} AS error_ratio, {quantile_ms(0.99)} AS p99_ms
FROM {CALLS} WHERE {to_me}""", w=18, overrides=RED_OVERRIDES),
        Row("Routes (service side: latency of the service itself)"),
        ts("Requests per second by route", f"""
SELECT {BUCKET} AS time, concat(toString(method), ' ', {ROUTE}) AS route, count() / {PER_SECOND} AS rps
FROM {CALLS} WHERE {to_me}
GROUP BY time, route ORDER BY time""", unit="reqps"),
        ts("Latency quantiles", f"""
SELECT {BUCKET} AS time, quantile(0.5)({MS}) AS p50, quantile(0.9)({MS}) AS p90, quantile(0.99)({MS}) AS p99
FROM {CALLS} WHERE {to_me}
GROUP BY time ORDER BY time""", unit="ms"),
        table("Latency per route", f"""
SELECT toString(method) AS method, {ROUTE} AS route, count() AS calls, {error_ratio()} AS error_ratio,
       {quantile_ms(0.5)} AS p50_ms, {quantile_ms(0.9)} AS p90_ms, {quantile_ms(0.99)} AS p99_ms,
       {quantile_ms(0.999)} AS p999_ms, round(max(duration_ns) / 1e6, 3) AS max_ms
FROM {CALLS} WHERE {to_me}
GROUP BY method, route ORDER BY calls DESC""", w=14,
              overrides=[override("error_ratio", unit="percentunit")] +
                        [override(c, unit="ms") for c in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")]),
        Panel("Latency heatmap", "heatmap", [sql_target(f"""
SELECT {BUCKET} AS time, {heat}
FROM (SELECT time, {MS} AS ms FROM {CALLS} WHERE {to_me})
GROUP BY time ORDER BY time""", FORMAT_TIME_SERIES)], "Calls per latency bucket (upper bound, ms).", w=10,
              options={"calculate": False, "rowsFrame": {"layout": "le"}, "yAxis": {"unit": "ms"},
                       "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                       "cellGap": 1, "tooltip": {"mode": "single", "yHistogram": False}}),
        ts("Status codes", f"""
SELECT {BUCKET} AS time, {STATUS_CLASS} AS status_class, count() / {PER_SECOND} AS rps
FROM {CALLS} WHERE {to_me}
GROUP BY time, status_class ORDER BY time""", unit="reqps", stack=True),
        table("Policy actions and mode", f"""
SELECT if(mode = '', '(not a sidecar)', toString(mode)) AS mode, if(action = '', '(none)', toString(action)) AS action,
       count() AS calls
FROM {CALLS} WHERE {to_me}
GROUP BY mode, action ORDER BY calls DESC""",
              description="What policies did (retried, timed_out, ...) or would have done in dry-run (would_...)."),
        Row("Callers and callees (caller side)"),
        table("Callers", f"""
SELECT {CALLER} AS caller, any(toString(observer)) AS observer_used, {red_columns()},
       round(countIf(tls) / count(), 4) AS tls_share
FROM {CALLS} WHERE {callers}
GROUP BY caller ORDER BY calls DESC""", overrides=RED_OVERRIDES + [override("tls_share", unit="percentunit")]),
        table("Callees", f"""
SELECT {CALLEE} AS callee, any(toString(observer)) AS observer_used, {red_columns()},
       round(countIf(tls) / count(), 4) AS tls_share
FROM {CALLS} WHERE {from_me}
GROUP BY callee ORDER BY calls DESC""", overrides=RED_OVERRIDES + [override("tls_share", unit="percentunit")]),
    ]
    svc = query_var("service", "Service", f"""
SELECT DISTINCT {CALLEE} AS service FROM {CALLS} WHERE {WINDOW} ORDER BY service""".strip())
    return dashboard("meshlens-service", "meshlens / Service detail",
                     "One service: per-route latency quantiles and heatmap, status codes, callers, callees, mode.",
                     [clickhouse_datasource_var(), database_var(), svc, observer_var()], items,
                     annotations=change_annotations("'${service}'"))


def _heat_bucket(i: int) -> str:
    b = HEATMAP_BUCKETS_MS
    if i == 0:
        return f"countIf(ms <= {b[0]}) AS `{b[0]}`"
    if i == len(b):
        return f"countIf(ms > {b[-1]}) AS `+Inf`"
    return f"countIf(ms > {b[i - 1]} AND ms <= {b[i]}) AS `{b[i]}`"


# --- edge detail ----------------------------------------------------------------------

def edge() -> dict[str, Any]:
    pair = f"{CALLER} = '${{src}}' AND dst_service = '${{dst}}'"
    where = scope(pair)
    items: list[Panel | Row] = [
        Row("${src} -> ${dst}"),
        ts("Requests per second", f"""
SELECT {BUCKET} AS time, count() / {PER_SECOND} AS rps, countIf({FAILED}) / {PER_SECOND} AS failed_rps
FROM {CALLS} WHERE {where}
GROUP BY time ORDER BY time""", unit="reqps", w=8),
        ts("Latency quantiles", f"""
SELECT {BUCKET} AS time, quantile(0.5)({MS}) AS p50, quantile(0.95)({MS}) AS p95, quantile(0.99)({MS}) AS p99
FROM {CALLS} WHERE {where}
GROUP BY time ORDER BY time""", unit="ms", w=8),
        ts("Status codes", f"""
SELECT {BUCKET} AS time, {STATUS_CLASS} AS status_class, count() / {PER_SECOND} AS rps
FROM {CALLS} WHERE {where}
GROUP BY time, status_class ORDER BY time""", unit="reqps", w=8, stack=True),
        table("Per observer", f"""
SELECT toString(observer) AS observer, {red_columns()}
FROM {CALLS} WHERE {WINDOW} AND {pair}
GROUP BY observer ORDER BY observer""", w=12, overrides=RED_OVERRIDES,
              description="Every observer of this edge side by side, never summed: the client-side minus "
                          "server-side latency is the network and sidecar cost."),
        table("Per route", f"""
SELECT toString(method) AS method, {ROUTE} AS route, {red_columns()}
FROM {CALLS} WHERE {where}
GROUP BY method, route ORDER BY calls DESC""", w=12, overrides=RED_OVERRIDES),
        table("Slowest calls", f"""
SELECT time, toString(method) AS method, path, status, toString(error) AS error,
       round(duration_ns / 1e6, 3) AS duration_ms, trace_id
FROM {CALLS} WHERE {where}
ORDER BY duration_ns DESC LIMIT 50""", w=24, h=10,
              overrides=[override("duration_ms", unit="ms"), override("trace_id", links=TRACE_LINK)]),
    ]
    # Only edges that count once the observer rule has dropped other observers' copies.
    src = query_var("src", "Caller", f"SELECT DISTINCT {CALLER} AS caller FROM {CALLS} "
                                     f"WHERE {WINDOW} AND {observer_rule()} ORDER BY caller")
    dst = query_var("dst", "Callee", f"SELECT DISTINCT {CALLEE} AS callee FROM {CALLS} "
                                     f"WHERE {WINDOW} AND {CALLER} = '${{src}}' AND {observer_rule()} ORDER BY callee")
    return dashboard("meshlens-edge", "meshlens / Edge detail",
                     "One caller -> callee edge: rate, latency, status codes, each observer's view, routes, "
                     "slow calls.",
                     [clickhouse_datasource_var(), database_var(), src, dst, observer_var()], items,
                     annotations=change_annotations("'${dst}'"))

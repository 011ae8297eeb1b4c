"""The traces dashboard: the ClickHouse plugin's trace view over `otel_traces` (OTel exporter layout).

Like the plugin's own OpenTelemetry dashboards: a table of traces whose ids set
`trace_id`, and a trace panel (format 3) whose query returns the columns the
trace view reads: traceID, spanID, parentSpanID, serviceName, operationName,
startTime, duration (ms), tags and serviceTags (arrays of key/value maps), plus
kind, statusCode and statusMessage. The span lookup is bounded by the trace's
first and last span from `otel_traces_trace_id_ts`, as the exporter intends.
"""
from __future__ import annotations

from typing import Any

from meshlens.dashboards.mesh import table, ts
from meshlens.dashboards.model import (FORMAT_TRACE, Panel, Row, clickhouse_datasource_var, dashboard, database_var, override,
                              query_var, sql_target)
from meshlens.dashboards.sql import PER_SECOND, TRACE_ID_TS, TRACES

ERROR_STATUS = "StatusCode IN ('Error', 'STATUS_CODE_ERROR')"
TRACE_FILTER = "$__timeFilter(Timestamp)"
SERVICES = "$__conditionalAll(ServiceName IN (${service:singlequote}), $service)"
SET_TRACE = [{"title": "Show this trace",
              "url": "/d/meshlens-traces/traces?var-trace_id=${__value.raw}&${service:queryparam}&${__url_time_range}"}]

TRACE_VIEW_COLUMNS = ("traceID", "spanID", "parentSpanID", "serviceName", "operationName", "startTime", "duration",
                      "tags", "serviceTags")


def _kv(column: str) -> str:
    return f"arrayMap(k -> map('key', k, 'value', {column}[k]), mapKeys({column}))"


def trace_sql() -> str:
    return f"""WITH '${{trace_id}}' AS tid,
     (SELECT min(Start) FROM {TRACE_ID_TS} WHERE TraceId = tid) AS trace_start,
     (SELECT max(End) + 1 FROM {TRACE_ID_TS} WHERE TraceId = tid) AS trace_end
SELECT TraceId AS traceID, SpanId AS spanID, ParentSpanId AS parentSpanID, ServiceName AS serviceName,
       SpanName AS operationName, Timestamp AS startTime, Duration / 1e6 AS duration,
       {_kv('SpanAttributes')} AS tags, {_kv('ResourceAttributes')} AS serviceTags,
       lower(replaceOne(toString(SpanKind), 'SPAN_KIND_', '')) AS kind,
       multiIf({ERROR_STATUS}, 2, StatusCode IN ('Ok', 'STATUS_CODE_OK'), 1, 0) AS statusCode,
       StatusMessage AS statusMessage
FROM {TRACES}
WHERE TraceId = tid AND Timestamp >= trace_start AND Timestamp <= trace_end
ORDER BY Timestamp ASC LIMIT 1000"""


def traces() -> dict[str, Any]:
    items: list[Panel | Row] = [
        ts("Spans per second by service", f"""
SELECT $__timeInterval(Timestamp) AS time, toString(ServiceName) AS service, count() / {PER_SECOND} AS spans
FROM {TRACES} WHERE {TRACE_FILTER} AND {SERVICES}
GROUP BY time, service ORDER BY time""", unit="reqps", w=12),
        ts("Error spans per second by service", f"""
SELECT $__timeInterval(Timestamp) AS time, toString(ServiceName) AS service,
       countIf({ERROR_STATUS}) / {PER_SECOND} AS error_spans
FROM {TRACES} WHERE {TRACE_FILTER} AND {SERVICES}
GROUP BY time, service ORDER BY time""", unit="reqps", w=12),
        table("Traces", f"""
SELECT TraceId AS trace_id, min(Timestamp) AS start, argMin(toString(ServiceName), Timestamp) AS service,
       argMin(toString(SpanName), Timestamp) AS operation,
       round((max(toUnixTimestamp64Nano(Timestamp) + Duration) - min(toUnixTimestamp64Nano(Timestamp))) / 1e6, 3)
           AS duration_ms,
       count() AS spans, countIf({ERROR_STATUS}) AS errors
FROM {TRACES} WHERE {TRACE_FILTER} AND {SERVICES} AND TraceId != ''
GROUP BY TraceId ORDER BY start DESC LIMIT 200""", w=10, h=16,
              description="Recent traces; click a trace id to show it.",
              overrides=[override("trace_id", links=SET_TRACE), override("duration_ms", unit="ms")]),
        Panel("Trace ${trace_id}", "traces", [sql_target(trace_sql(), FORMAT_TRACE)],
              "The spans of the selected trace (the plugin's trace view).", w=14, h=16),
    ]
    service = query_var("service", "Service", f"SELECT DISTINCT toString(ServiceName) AS service FROM {TRACES} "
                                              f"WHERE {TRACE_FILTER} ORDER BY service", multi=True, include_all=True)
    trace_id = query_var("trace_id", "Trace id", f"""
SELECT TraceId FROM {TRACES} WHERE {TRACE_FILTER} AND {SERVICES} AND ParentSpanId = ''
ORDER BY Timestamp DESC LIMIT 100""".strip())
    trace_id["sort"] = 0
    return dashboard("meshlens-traces", "meshlens / Traces",
                     "OpenTelemetry traces from instrumented apps and sidecars, in the ClickHouse plugin's trace view.",
                     [clickhouse_datasource_var(), database_var(), service, trace_id], items, time_from="now-1h")

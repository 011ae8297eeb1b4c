"""The readiness dashboard: the figures behind `meshlens recommend`, as SQL over `calls`.

mTLS follows analysis/mtls.py: counts use one observer per edge (caller side
first), while *which* observers saw a caller decides whether it is meshed (its
own sidecar, observer `client`, recorded some call in the window). Timeouts and
retries follow analysis/route_stats.py and analysis/timeouts.py. The constants
are restated because dashboards import only `collector`; the tests check them
against analysis.
"""
from __future__ import annotations

from typing import Any

from meshlens.dashboards.mesh import RED_OVERRIDES, WINDOW_SECONDS, table, ts
from meshlens.dashboards.model import Panel, Row, clickhouse_datasource_var, dashboard, database_var, override, query_var
from meshlens.dashboards.sql import (BUCKET, CALLEE, CALLER, CALLS, FAILED, HEALTHY, ROUTE, WINDOW, observer_rule,
                            services_filter)

MTLS_MIN_N = 100  # analysis.mtls.MTLS_MIN_N: inbound calls to a service before any verdict
TIMEOUT_HEADROOM = 1.5  # analysis.timeouts.HEADROOM
# analysis.route_stats.TRANSIENT_SQL: for gRPC only what the server did not process
TRANSIENT = ("if(protocol = 'grpc', (error IN ('refused', 'connect_failure', 'connect_error') "
             "OR attributes['h2.reset'] = 'REFUSED_STREAM' OR (grpc_status = 14 AND response_bytes = 0)), "
             "(error IN ('refused', 'reset', 'connect_failure', 'connect_error') OR status IN (502, 503, 504)))")
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")  # analysis.retries

MESHED_CALLERS = f"SELECT DISTINCT {CALLER} FROM {CALLS} WHERE {WINDOW} AND observer = 'client'"
SEEN_BY = (f"SELECT {CALLEE} AS callee, {CALLER} AS caller, "
           f"arrayStringConcat(arraySort(groupUniqArray(toString(observer))), ',') AS seen_by "
           f"FROM {CALLS} WHERE {WINDOW} AND {services_filter()} GROUP BY callee, caller")


def edges_sql() -> str:
    """Per callee and caller, one observer per edge: calls, TLS and plaintext calls, meshed or not."""
    return f"""SELECT {CALLEE} AS callee, {CALLER} AS caller, count() AS n, countIf(tls) AS tls_n,
       countIf(NOT tls) AS plain_n, caller IN ({MESHED_CALLERS}) AS meshed,
       arrayStringConcat(groupUniqArrayIf(peer_identity, peer_identity != ''), ',') AS identities
FROM {CALLS} WHERE {WINDOW} AND {services_filter()} AND {observer_rule()}
GROUP BY callee, caller"""


def readiness() -> dict[str, Any]:
    idempotent = ", ".join(f"'{m}'" for m in IDEMPOTENT_METHODS)
    items: list[Panel | Row] = [
        Row("mTLS"),
        table("mTLS readiness per service", f"""
SELECT callee, count() AS callers, sum(n) AS calls, sum(tls_n) AS tls_calls, sum(plain_n) AS plaintext_calls,
       arrayStringConcat(arraySort(groupArrayIf(caller, NOT meshed)), ', ') AS unmeshed_callers,
       multiIf(calls < {MTLS_MIN_N}, concat('not enough data (n=', toString(calls), ')'),
               unmeshed_callers != '', concat('blocked by ', unmeshed_callers),
               plaintext_calls > 0, 'PERMISSIVE first',
               'STRICT-ready') AS verdict,
       multiIf(calls < {MTLS_MIN_N}, '', verdict = 'STRICT-ready', 'STRICT', 'PERMISSIVE') AS peer_authentication
FROM ({edges_sql()})
GROUP BY callee ORDER BY callee""", w=24,
              description="The verdict analysis gives: not enough data below {MTLS_MIN_N} inbound calls, blocked "
                          "while a caller has no sidecar, PERMISSIVE while meshed callers still send plaintext, "
                          "STRICT once every call uses TLS.".format(MTLS_MIN_N=MTLS_MIN_N)),
        table("Callers: TLS vs plaintext", f"""
SELECT e.callee AS callee, e.caller AS caller, e.meshed AS meshed, s.seen_by AS seen_by, e.n AS calls,
       e.tls_n AS tls_calls, e.plain_n AS plaintext_calls, e.identities AS peer_identities
FROM ({edges_sql()}) AS e
LEFT JOIN ({SEEN_BY}) AS s ON e.callee = s.callee AND e.caller = s.caller
ORDER BY callee, caller""", w=14, h=10),
        table("Unmeshed callers", f"""
SELECT e.caller AS caller, e.callee AS callee, s.seen_by AS seen_by, e.n AS calls, e.plain_n AS plaintext_calls
FROM ({edges_sql()}) AS e
LEFT JOIN ({SEEN_BY}) AS s ON e.callee = s.callee AND e.caller = s.caller
WHERE NOT e.meshed
ORDER BY calls DESC""", w=10, h=10,
              description="Callers no sidecar of their own recorded (no `client` row): seen only by the tap "
                          "(wire), their own spans (otlp) or the callee's sidecar (server). They block STRICT."),
        ts("Plaintext share by service", f"""
SELECT {BUCKET} AS time, {CALLEE} AS service, countIf(NOT tls) / count() AS plaintext_share
FROM {CALLS} WHERE {WINDOW} AND {services_filter()} AND {observer_rule()}
GROUP BY time, service ORDER BY time""", unit="percentunit", w=12),
        table("Mode per service", f"""
SELECT {CALLEE} AS service, if(countIf(mode != '') = 0, '(no sidecar)', argMaxIf(toString(mode), time, mode != ''))
           AS mode, count() AS calls,
       countIf(startsWith(action, 'would_')) AS would_act, countIf(action != '' AND NOT startsWith(action, 'would_'))
           AS acted
FROM {CALLS} WHERE {WINDOW} AND {services_filter()} AND {observer_rule()}
GROUP BY service ORDER BY service""", w=12,
              description="would_act: calls a dry-run policy would have changed; acted: calls an enforced one did."),
        Row("Timeouts and retries (caller side, per route)"),
        table("Latency and failure figures per route", f"""
SELECT {CALLER} AS caller, {CALLEE} AS callee, toString(method) AS method, {ROUTE} AS route, count() AS calls,
       round(count() / {WINDOW_SECONDS}, 3) AS rps,
       round(countIf({FAILED}) / count(), 4) AS error_ratio, countIf({TRANSIENT}) AS transient_failures,
       round(quantileIf(0.5)(duration_ns, {HEALTHY}) / 1e6, 3) AS p50_ms,
       round(quantileIf(0.99)(duration_ns, {HEALTHY}) / 1e6, 3) AS p99_ms,
       round(quantileIf(0.999)(duration_ns, {HEALTHY}) / 1e6, 3) AS p999_ms,
       round(maxIf(duration_ns, {HEALTHY}) / 1e6, 3) AS max_ok_ms,
       round(greatest(p999_ms * {TIMEOUT_HEADROOM}, max_ok_ms), 3) AS timeout_floor_ms,
       method IN ({idempotent}) AS idempotent
FROM {CALLS} WHERE {WINDOW} AND {services_filter()} AND {observer_rule()}
GROUP BY caller, callee, method, route ORDER BY calls DESC LIMIT 200""", w=24, h=12,
              description="Healthy-call quantiles (no error, < 500), transient failures (refused, reset, 502-504) "
                          f"and the timeout floor: max(p99.9 x {TIMEOUT_HEADROOM}, slowest healthy call).",
              overrides=RED_OVERRIDES + [override(c, unit="ms") for c in ("p999_ms", "max_ok_ms",
                                                                          "timeout_floor_ms")]),
    ]
    svc = query_var("service", "Service", f"SELECT DISTINCT {CALLEE} AS service FROM {CALLS} WHERE {WINDOW} "
                                          "ORDER BY service", multi=True, include_all=True)
    return dashboard("meshlens-readiness", "meshlens / Readiness",
                     "Before enforcing: mTLS readiness per service, unmeshed callers, and the latency and failure "
                     "figures behind timeout and retry recommendations.",
                     [clickhouse_datasource_var(), database_var(), svc], items, time_from="now-6h")

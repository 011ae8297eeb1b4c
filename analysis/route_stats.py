"""Per caller → callee route figures that timeouts and retries share, in one pass over the calls.

The templated route costs a regular expression per row (analysis.routes), so
both questions read one query: an inner GROUP BY per RETRY_WINDOW_S bucket
(what a retry would meet, see analysis.retries) carrying t-digest states of
healthy latency, merged per route outside. On 10M calls this is ~15% faster
than two queries.
"""
from __future__ import annotations

import pandas as pd

from meshlens.analysis.scope import FAILED_SQL, HEALTHY_SQL, Scope
from meshlens.analysis.window import quote

IDEMPOTENCY_KEYS: tuple[str, ...] = ("idempotency-key", "x-idempotency-key")
# HTTP: refused, reset and connection failures, 502/503/504 (analysis.retries: retried on an idempotent
# method or a keyed request only).
HTTP_TRANSIENT_SQL = ("(error IN ('refused', 'reset', 'connect_failure', 'connect_error') "
                      "OR status IN (502, 503, 504))")
# gRPC has no idempotent verbs, so only what the server did not process: a connection that failed or was
# refused, a stream refused (REFUSED_STREAM; the tap's GOAWAY past the stream is `refused`), and UNAVAILABLE
# before any response message (the trailers-only answer of a server that did not take the call; Envoy
# retries gRPC on the status in the response headers only: one after a message is too late to retry).
GRPC_TRANSIENT_SQL = ("(error IN ('refused', 'connect_failure', 'connect_error') "
                      "OR attributes['h2.reset'] = 'REFUSED_STREAM' OR (grpc_status = 14 AND response_bytes = 0))")
TRANSIENT_SQL = f"if(protocol = 'grpc', {GRPC_TRANSIENT_SQL}, {HTTP_TRANSIENT_SQL})"
# A retry is sent within about a second; 10 s keeps enough neighbours at modest rates.
RETRY_WINDOW_S = 10
STREAMING_ROUTE_RE = r"(?i)/(stream|streams|streaming|watch|events|subscribe|sse|ws|websocket|long-?poll|poll)(/|$|\?)"
QS = "0.5, 0.9, 0.99, 0.999"
# Distinct recorded paths kept per route: what an Istio uri match written for the
# route is checked against (analysis.uri_match.unmatched) before it is written.
PATH_SAMPLE = 100


def route_stats(scope: Scope, paths: bool = True) -> pd.DataFrame:
    """caller, callee, method, route: n, ok, failed, transient, informed, recovered, keyed, upgraded,
    stream_name, grpc (calls of gRPC), grpc_not_transient ({gRPC status: calls} of the calls with a status
    other than OK that are not transient),
    max_ok_s, p50_s/p90_s/p99_s/p999_s (healthy calls), p_retry, and up to PATH_SAMPLE
    distinct recorded paths (an empty list when the calls carry a route but no path, or when `paths`
    is False: only the Istio YAML needs them, and keeping them costs ~25 % of a whole
    `meshlens recommend` on 10M calls, bench/analysis.py)."""
    outer_paths = f"groupUniqArrayArray({PATH_SAMPLE})(bpaths)" if paths else "CAST([], 'Array(String)')"
    inner_paths = f",\n             groupUniqArrayIf({PATH_SAMPLE})(path, path != '') AS bpaths" if paths else ""
    keyed = " OR ".join(f"mapContains(attributes, {quote(k)})" for k in IDEMPOTENCY_KEYS)
    sql = f"""SELECT caller, callee, method, route, sum(bn) AS n, sum(bok) AS ok, sum(bf) AS failed,
       sum(bt) AS transient, sumIf(bt, bn > 1) AS informed, sumIf(bt * bok / (bn - 1), bn > 1) AS recovered,
       sum(bk) AS keyed, sum(bup) > 0 AS upgraded, match(route, {quote(STREAMING_ROUTE_RE)}) AS stream_name,
       max(bg) AS grpc, CAST(sumMap(bc.1, bc.2), 'Map(Int16, UInt64)') AS codes,
       max(bmax) / 1e9 AS max_ok_s, quantilesTDigestIfMerge({QS})(bq) AS q,
       {outer_paths} AS paths
FROM (SELECT caller, toString(dst_service) AS callee, toString(method) AS method, route_t AS route,
             intDiv(toUnixTimestamp64Nano(time), {RETRY_WINDOW_S * 10**9}) AS b,
             count() AS bn, countIf({FAILED_SQL}) AS bf, countIf({TRANSIENT_SQL}) AS bt,
             countIf({HEALTHY_SQL}) AS bok, countIf({keyed}) AS bk,
             countIf(lower(attributes['upgrade']) = 'websocket' OR protocol = 'tcp') AS bup,
             max(protocol = 'grpc') AS bg,
             sumMapIf([grpc_status], [toUInt64(1)], grpc_status > 0 AND NOT {TRANSIENT_SQL}) AS bc,
             maxIf(duration_ns, {HEALTHY_SQL}) AS bmax,
             quantilesTDigestIfState({QS})(duration_ns, {HEALTHY_SQL}) AS bq{inner_paths}
      FROM {scope.calls()} GROUP BY caller, callee, method, route, b)
GROUP BY caller, callee, method, route ORDER BY caller, callee, route, method"""
    df = scope.frame(sql)
    q = pd.DataFrame(df.pop("q").tolist(), columns=["p50_s", "p90_s", "p99_s", "p999_s"], index=df.index) / 1e9
    df = pd.concat([df, q], axis=1)
    df["grpc"] = df["grpc"].astype(bool)
    df["grpc_not_transient"] = [{int(k): int(v) for k, v in codes} for codes in df.pop("codes")]
    df["p_retry"] = (df["recovered"] / df["informed"]).where(df["informed"] > 0)
    return df

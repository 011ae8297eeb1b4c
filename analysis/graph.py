"""The traffic model: service graph edges, per-route breakdown and time series, aggregated in SQL."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from meshlens.analysis.evidence import quantile_confidence
from meshlens.analysis.scope import FAILED_SQL, Scope

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
Q_NAMES: tuple[str, ...] = ("p50_ms", "p90_ms", "p99_ms", "p999_ms")


def _stats(scope: Scope, keys: list[str], side: str) -> pd.DataFrame:
    qs = ", ".join(str(q) for q in QUANTILES)
    group = ", ".join(keys)
    sql = f"""SELECT {group}, any(toString(observer)) AS observer,
       arrayStringConcat(arraySort(groupUniqArray(toString(protocol))), ',') AS protocol,
       count() AS n, countIf({FAILED_SQL}) AS errors, quantilesTDigest({qs})(duration_ns) AS q
FROM {scope.calls(side=side)} GROUP BY {group} ORDER BY n DESC"""
    df = scope.frame(sql)
    q = pd.DataFrame(df.pop("q").tolist(), columns=list(Q_NAMES), index=df.index) / 1e6 if len(df) else \
        pd.DataFrame(columns=list(Q_NAMES))
    df = pd.concat([df, q], axis=1)
    df["rate_per_s"] = df["n"] / scope.seconds
    df["error_rate"] = df["errors"] / df["n"]
    df["confidence"] = [f"p99.9 {quantile_confidence(int(n), 0.999)}, p99 {quantile_confidence(int(n), 0.99)}"
                        for n in df["n"]]
    return df


def edges(scope: Scope) -> pd.DataFrame:
    """caller → callee with its protocols (http/1.1, grpc, ... comma-separated), rate, error rate (a gRPC call
    answered 200 with a server error is a failure: analysis.scope.FAILED_SQL), p50/p90/p99/p99.9 (ms) and how far
    the tail can be trusted."""
    df = _stats(scope, ["caller", "toString(dst_service) AS callee"], "either")
    return df[["caller", "callee", "protocol", "observer", "n", "rate_per_s", "errors", "error_rate", *Q_NAMES,
               "confidence"]]


def routes(scope: Scope) -> pd.DataFrame:
    """The same figures per caller → callee, method and templated route (for gRPC both are the method path)."""
    df = _stats(scope, ["caller", "toString(dst_service) AS callee", "toString(method) AS method", "route_t AS route"],
                "either")
    return df[["caller", "callee", "method", "route", "protocol", "observer", "n", "rate_per_s", "errors", "error_rate",
               *Q_NAMES, "confidence"]]


def timeseries(scope: Scope, bucket_s: int = 60) -> pd.DataFrame:
    """Per edge and time bucket: calls, errors and p99 (ms)."""
    sql = f"""SELECT toStartOfInterval(time, INTERVAL {int(bucket_s)} SECOND) AS bucket, caller,
       toString(dst_service) AS callee, count() AS n, countIf({FAILED_SQL}) AS errors,
       quantileTDigest(0.99)(duration_ns) / 1e6 AS p99_ms
FROM {scope.calls(side='either')} GROUP BY bucket, caller, callee ORDER BY bucket, caller, callee"""
    return scope.frame(sql)


def downstream_depth(pairs) -> dict[str, int]:
    """For each service, the longest chain of calls it starts (0 = calls nobody); cycles are cut.

    `pairs`: (caller, callee) tuples, or an edges() frame.
    """
    if isinstance(pairs, pd.DataFrame):
        pairs = zip(pairs["caller"], pairs["callee"])
    out: dict[str, list[str]] = {}
    for a, b in pairs:
        if a != b:
            out.setdefault(a, []).append(b)
    memo: dict[str, int] = {}

    def depth(s: str, seen: frozenset[str]) -> int:
        if s in memo:
            return memo[s]
        d = max((1 + depth(c, seen | {s}) for c in out.get(s, []) if c not in seen), default=0)
        memo[s] = d
        return d

    services = set(out) | {c for cs in out.values() for c in cs}
    return {s: depth(s, frozenset()) for s in services}


def call_levels(pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Each service's column in a drawing of the graph (the notebooks', the console's map): 0 for one nobody calls,
    else one past its deepest caller; a cycle is cut where it closes, so each service of a loop still gets a
    column. Sorted walks: the same graph is drawn the same way every time."""
    callers: dict[str, set[str]] = {}
    for a, b in pairs:
        callers.setdefault(a, set())
        if a != b:
            callers.setdefault(b, set()).add(a)
    memo: dict[str, int] = {}

    def level(s: str, path: frozenset[str]) -> int:
        if s not in memo:
            memo[s] = max((1 + level(c, path | {s}) for c in sorted(callers[s]) if c not in path), default=0)
        return memo[s]

    return {s: level(s, frozenset()) for s in sorted(callers)}

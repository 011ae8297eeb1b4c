"""Shapes behind the summary figures: latency histograms and error classes per caller → callee edge.

Both are aggregated in ClickHouse over Scope.calls() (one observer per edge);
what reaches pandas is a few rows per edge, small enough to plot.
"""
from __future__ import annotations

import pandas as pd

from meshlens.analysis.scope import Scope
from meshlens.collector.spans import GRPC_NAMES

# Histogram resolution: 10 buckets per decade (each ~26% wider than the last) resolves a p99 from a p50
# on a log axis while keeping an edge at ~60 rows from 10 µs to 1000 s.
BUCKETS_PER_DECADE = 10

# A failed call's class: the error the observer recorded, else the 5xx status, else a gRPC status other than
# OK by its name (DEADLINE_EXCEEDED is a timeout, the class a deadline the caller set is), else the 4xx family.
_GRPC_CODES = sorted(GRPC_NAMES)
ERROR_CLASS_SQL = ("multiIf(error != '', toString(error), status >= 500, toString(status), grpc_status = 4, 'timeout', "
                   f"grpc_status > 0, transform(grpc_status, {_GRPC_CODES}, {[GRPC_NAMES[c] for c in _GRPC_CODES]}, "
                   "toString(grpc_status)), status >= 400, '4xx', '')")


def latency_histogram(scope: Scope, side: str = "either") -> pd.DataFrame:
    """Per caller → callee and log-spaced bucket: calls, share of the edge, and the bucket's lower edge (ms)."""
    b = BUCKETS_PER_DECADE
    sql = f"""SELECT caller, toString(dst_service) AS callee,
       floor(log10(greatest(duration_ns, 1000) / 1e6) * {b}) AS bucket, count() AS n
FROM {scope.calls(side=side)} GROUP BY caller, callee, bucket ORDER BY caller, callee, bucket"""
    df = scope.frame(sql)
    df["ms"] = 10 ** (df["bucket"] / b)
    df["share"] = df["n"] / df.groupby(["caller", "callee"])["n"].transform("sum")
    return df


def error_classes(scope: Scope, side: str = "either") -> pd.DataFrame:
    """Per caller → callee and failure class (refused, reset, timeout, 503, UNAVAILABLE, 4xx, …): calls and share of
    the edge."""
    sql = f"""SELECT caller, callee, error_class, n, total, n / total AS share
FROM (SELECT caller, toString(dst_service) AS callee, {ERROR_CLASS_SQL} AS error_class, count() AS n,
             sum(n) OVER (PARTITION BY caller, callee) AS total
      FROM {scope.calls(side=side)} GROUP BY caller, callee, error_class)
WHERE error_class != '' ORDER BY caller, callee, n DESC"""
    return scope.frame(sql)

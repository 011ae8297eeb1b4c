"""Connection-pool limits per destination service from observed peak concurrency.

Concurrency in a second is the sum of call durations in it divided by one
second (Little's law); the limits leave POOL_HEADROOM× room over the busiest
second so that they only bite on a pile-up, never on a normal peak.
"""
from __future__ import annotations

import math

import pandas as pd

from meshlens.analysis.evidence import Evidence, Recommendation, confidence_from_n, not_enough
from meshlens.analysis.scope import Scope

POOL_MIN_N = 1000
POOL_HEADROOM = 2.0
# Envoy's retry budget default: retries up to 20% of active requests, at least 3 concurrent.
RETRY_BUDGET_SHARE = 0.2
RETRY_BUDGET_MIN = 3


def concurrency_frame(scope: Scope) -> pd.DataFrame:
    sql = f"""SELECT callee, sum(bn) AS n, max(busy_s) AS peak_concurrency, avg(busy_s) AS mean_concurrency
FROM (SELECT toString(dst_service) AS callee, toStartOfSecond(time) AS s, count() AS bn,
             sum(duration_ns) / 1e9 AS busy_s
      FROM {scope.calls()} WHERE protocol != 'tcp' GROUP BY callee, s)
GROUP BY callee ORDER BY callee"""
    return scope.frame(sql)


def recommend_pools(scope: Scope, frame: pd.DataFrame | None = None) -> list[Recommendation]:
    df = concurrency_frame(scope) if frame is None else frame
    out = []
    for r in df.itertuples():
        target = {"callee": r.callee}
        if r.n < POOL_MIN_N:
            out.append(Recommendation("connection_pool", target, None,
                                      not_enough(scope.label(), int(r.n), POOL_MIN_N, "calls")))
            continue
        limit = max(10, math.ceil(r.peak_concurrency * POOL_HEADROOM))
        policy = {"tcp": {"maxConnections": limit},
                  "http": {"http1MaxPendingRequests": max(10, math.ceil(r.peak_concurrency)),
                           "http2MaxRequests": limit,
                           "maxRetries": max(RETRY_BUDGET_MIN, math.ceil(r.peak_concurrency * RETRY_BUDGET_SHARE))}}
        reason = (f"peak concurrency {r.peak_concurrency:.1f} (mean {r.mean_concurrency:.1f}) over {int(r.n)} calls; "
                  f"limits at {POOL_HEADROOM}× the peak; maxRetries is Envoy's 20% retry budget of the peak")
        out.append(Recommendation("connection_pool", target, policy, Evidence(
            scope.label(), int(r.n), {"peak_concurrency": round(float(r.peak_concurrency), 2),
                                      "mean_concurrency": round(float(r.mean_concurrency), 2)},
            confidence_from_n(int(r.n), POOL_MIN_N, 10 * POOL_MIN_N), reason)))
    return out

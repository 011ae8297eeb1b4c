"""Outlier detection (circuit breaking per instance) from per-instance error bursts.

An instance is `dst_addr:dst_port`. It is an outlier when its failure rate
stands out from its peers of the same service (OUTLIER_RATIO × their median and
at least OUTLIER_MIN_RATE) or it has bursts: INTERVAL_S buckets where at least
half its calls failed. Failures here are what Envoy's consecutive 5xx counter
sees: 5xx responses and locally originated errors (refused, reset, timeout);
gateway errors are 502/503/504 and connect failures.
"""
from __future__ import annotations

import math

import pandas as pd

from analysis.evidence import Evidence, Recommendation, confidence_from_n, not_enough
from analysis.scope import FAILED_SQL, Scope

GATEWAY_SQL = "(status IN (502, 503, 504) OR error IN ('refused', 'reset', 'connect_failure', 'connect_error'))"
# Istio's defaults (destination_rule.proto OutlierDetection): interval 10s, baseEjectionTime 30s,
# maxEjectionPercent 10, consecutive5xxErrors 5, consecutiveGatewayErrors 0 (off).
INTERVAL_S = 10
BASE_EJECTION_S = 30
ISTIO_MAX_EJECTION_PERCENT = 10
ISTIO_CONSECUTIVE_5XX = 5
OUTLIER_MIN_N = 200        # calls per instance before judging it
OUTLIER_MIN_RATE = 0.05    # an instance failing less than this is not ejected, whatever its peers do
OUTLIER_RATIO = 3.0        # ...and must fail this many times more often than the median peer
BURST_SHARE = 0.5          # a bucket where half the calls failed is a burst
FALSE_EJECTIONS_MAX = 0.01  # healthy instances: expected ejections per interval must stay below this


def instance_frame(scope: Scope) -> pd.DataFrame:
    """Per callee and instance: calls, failures, gateway errors, bursts and busiest interval."""
    sql = f"""SELECT callee, instance, sum(bn) AS n, sum(bf) AS failed, sum(bg) AS gateway,
       countIf(bf >= 3 AND bf * 2 >= bn) AS bursts, max(bn) AS peak_per_interval
FROM (SELECT toString(dst_service) AS callee, instance, intDiv(toUnixTimestamp64Nano(time), {INTERVAL_S * 10**9}) AS b,
             count() AS bn, countIf({FAILED_SQL}) AS bf, countIf({GATEWAY_SQL}) AS bg
      FROM {scope.calls()} WHERE dst_port != 0 GROUP BY callee, instance, b)
GROUP BY callee, instance ORDER BY callee, instance"""
    df = scope.frame(sql)
    df["rate"] = df["failed"] / df["n"]
    return df


def consecutive_threshold(healthy_rate: float, calls_per_interval: float) -> int:
    """Fewest consecutive failures that a healthy instance reaches by chance less than FALSE_EJECTIONS_MAX per interval."""
    for k in range(3, 11):
        if calls_per_interval * healthy_rate ** k < FALSE_EJECTIONS_MAX:
            return k
    return 10


def recommend_outliers(scope: Scope, frame: pd.DataFrame | None = None) -> list[Recommendation]:
    df = instance_frame(scope) if frame is None else frame
    out = []
    for callee, g in df.groupby("callee", sort=True):
        target = {"callee": str(callee)}
        judged = g[g["n"] >= OUTLIER_MIN_N]
        n = int(g["n"].sum())
        if len(judged) < 2:
            out.append(Recommendation("outlier", target, None, not_enough(
                scope.label(), len(judged), 2, f"instances with {OUTLIER_MIN_N}+ calls each")))
            continue
        median = float(judged["rate"].median())
        bad = judged[(judged["rate"] >= max(OUTLIER_MIN_RATE, OUTLIER_RATIO * median))]
        healthy = judged.drop(bad.index)
        figures = {"instances": {r.instance: {"n": int(r.n), "failure_rate": round(float(r.rate), 4),
                                              "bursts": int(r.bursts)} for r in judged.itertuples()},
                   "median_failure_rate": round(median, 4)}
        if bad.empty:
            out.append(Recommendation("outlier", target, None, Evidence(
                scope.label(), n, figures, confidence_from_n(n, 1000, 10000),
                f"no instance stands out: the worst fails {float(judged['rate'].max()):.2%}, under the "
                f"{max(OUTLIER_MIN_RATE, OUTLIER_RATIO * median):.1%} that would mark an outlier")))
            continue
        h_rate = float(healthy["failed"].sum() / healthy["n"].sum()) if len(healthy) else 0.0
        per_interval = float(judged["n"].sum() / len(judged) / max(scope.seconds / INTERVAL_S, 1.0))
        k = consecutive_threshold(h_rate, per_interval)
        gw_share = float(bad["gateway"].sum() / max(bad["failed"].sum(), 1))
        max_pct = max(ISTIO_MAX_EJECTION_PERCENT, math.ceil(100 * len(bad) / len(g)))
        policy = {"consecutive5xxErrors": k, "consecutiveGatewayErrors": k if gw_share >= 0.9 else 0,
                  "interval": f"{INTERVAL_S}s", "baseEjectionTime": f"{BASE_EJECTION_S}s",
                  "maxEjectionPercent": max_pct, "eject": sorted(bad["instance"])}
        names = ", ".join(f"{r.instance} ({r.rate:.1%}, {int(r.bursts)} bursts)" for r in bad.itertuples())
        reason = (f"{names} fail(s) far more than the median instance ({median:.2%}); healthy instances fail "
                  f"{h_rate:.2%}, so {k} consecutive failures almost never happen by chance "
                  f"(< {FALSE_EJECTIONS_MAX} per {INTERVAL_S}s interval at ~{per_interval:.0f} calls)")
        out.append(Recommendation("outlier", target, policy, Evidence(
            scope.label(), n, figures | {"healthy_failure_rate": round(h_rate, 5)},
            confidence_from_n(int(bad["failed"].sum()), 20, 200), reason)))
    return out

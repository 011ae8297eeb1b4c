"""Outlier detection (circuit breaking per instance) from true consecutive-error runs.

An instance is `dst_addr:dst_port` of a destination service. Envoy ejects an
instance after N *consecutive* errors, so that is what is measured: in
ClickHouse, each instance's calls are put in time order and the length of
every run of consecutive failures is counted (analysis.runs). Failures are
what Envoy's consecutive-5xx counter sees: 5xx responses, gRPC server errors
(Envoy maps a grpc-status to the HTTP status it feeds the detector, so a 200
carrying UNAVAILABLE is a 503 to it: analysis.scope.FAILED_SQL) and locally
originated errors (with split_external_local_origin_errors off, its default,
connect failures, resets and timeouts count as 503/504); gateway errors are
502/503/504, UNAVAILABLE and DEADLINE_EXCEEDED, and those same local errors.

Which instances are bad is decided by failure rate against their peers (an
outlier fails OUTLIER_RATIO × the median peer and at least OUTLIER_MIN_RATE);
the threshold N comes from the runs: longer than any run a healthy instance
had in the window, and long enough that a healthy instance reaches it by
chance less than FALSE_EJECTIONS_MAX times per interval.
"""
from __future__ import annotations

import math

import pandas as pd

from meshlens.analysis.evidence import Evidence, Recommendation, confidence_from_n, not_enough
from meshlens.analysis.runs import GATEWAY_SQL, MAX_RUN, run_histogram_sql
from meshlens.analysis.scope import Scope

# Istio's defaults (destination_rule.proto OutlierDetection): interval 10s, baseEjectionTime 30s,
# maxEjectionPercent 10, consecutive5xxErrors 5, consecutiveGatewayErrors 0 (off).
INTERVAL_S = 10
BASE_EJECTION_S = 30
ISTIO_MAX_EJECTION_PERCENT = 10
OUTLIER_MIN_N = 200        # calls per instance before judging it
OUTLIER_MIN_RATE = 0.05    # an instance failing less than this is not ejected, whatever its peers do
OUTLIER_RATIO = 3.0        # ...and must fail this many times more often than the median peer
MIN_CONSECUTIVE = 3        # two failures in a row happen to any busy instance; never eject on fewer than 3
FALSE_EJECTIONS_MAX = 0.01  # healthy instances: expected ejections per interval must stay below this
GATEWAY_SHARE = 0.9        # bad instances' failures that must be gateway errors to use that counter too

__all__ = ["BASE_EJECTION_S", "GATEWAY_SQL", "INTERVAL_S", "instance_frame", "recommend_outliers"]


def instance_frame(scope: Scope) -> pd.DataFrame:
    """Per callee and instance: calls, failures, gateway errors, longest runs and run counts.

    `runs_ge[k-1]` is the number of runs of k or more consecutive failures (k = 1..MAX_RUN);
    `gateway_runs_ge` the same for consecutive gateway errors.
    """
    df = scope.frame(run_histogram_sql(scope.calls(), "dst_port != 0"))
    df["rate"] = df["failed"] / df["n"]
    return df


def consecutive_threshold(healthy_rate: float, calls_per_interval: float, longest_healthy_run: int = 0) -> int:
    """Fewest consecutive failures that healthy instances never reached in the window and reach by chance
    less than FALSE_EJECTIONS_MAX times per interval; capped at MAX_RUN."""
    for k in range(max(MIN_CONSECUTIVE, longest_healthy_run + 1), MAX_RUN + 1):
        if calls_per_interval * healthy_rate ** k < FALSE_EJECTIONS_MAX:
            return k
    return MAX_RUN


def _runs_at(row, column: str, k: int) -> int:
    return int(row[column][k - 1]) if 1 <= k <= len(row[column]) else 0


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
                                              "longest_run": int(r.longest_run),
                                              "longest_gateway_run": int(r.longest_gateway_run)}
                                 for r in judged.itertuples()},
                   "median_failure_rate": round(median, 4)}
        if bad.empty:
            out.append(Recommendation("outlier", target, None, Evidence(
                scope.label(), n, figures, confidence_from_n(n, 1000, 10000),
                f"no instance stands out: the worst fails {float(judged['rate'].max()):.2%}, under the "
                f"{max(OUTLIER_MIN_RATE, OUTLIER_RATIO * median):.1%} that would mark an outlier")))
            continue
        out.append(_eject(scope, g, target, n, figures, median, bad, healthy))
    return out


def _eject(scope: Scope, g: pd.DataFrame, target: dict[str, str], n: int, figures: dict, median: float,
           bad: pd.DataFrame, healthy: pd.DataFrame) -> Recommendation:
    """The outlierDetection policy that ejects `bad`, with N chosen from the measured runs."""
    h_n = int(healthy["n"].sum())
    h_rate = float(healthy["failed"].sum() / h_n) if h_n else 0.0
    h_gw_rate = float(healthy["gateway"].sum() / h_n) if h_n else 0.0
    longest = int(healthy["longest_run"].max()) if len(healthy) else 0
    longest_gw = int(healthy["longest_gateway_run"].max()) if len(healthy) else 0
    per_interval = float(g["n"].sum() / len(g) / max(scope.seconds / INTERVAL_S, 1.0))
    k = consecutive_threshold(h_rate, per_interval, longest)
    gw_share = float(bad["gateway"].sum() / max(bad["failed"].sum(), 1))
    k_gw = consecutive_threshold(h_gw_rate, per_interval, longest_gw) if gw_share >= GATEWAY_SHARE else 0
    max_pct = max(ISTIO_MAX_EJECTION_PERCENT, math.ceil(100 * len(bad) / len(g)))
    policy = {"consecutive5xxErrors": k, "consecutiveGatewayErrors": k_gw,
              "interval": f"{INTERVAL_S}s", "baseEjectionTime": f"{BASE_EJECTION_S}s",
              "maxEjectionPercent": max_pct, "eject": sorted(bad["instance"])}
    trips = {r["instance"]: _runs_at(r, "runs_ge", k) for _, r in bad.iterrows()}
    figures = figures | {"healthy_failure_rate": round(h_rate, 5), "longest_healthy_run": longest,
                         "longest_healthy_gateway_run": longest_gw, "runs_of_k_on_ejected": trips}
    names = ", ".join(f"{r.instance} ({r.rate:.1%}, {trips[r.instance]} runs of {k}+)" for r in bad.itertuples())
    reason = (f"{names} fail(s) far more than the median instance ({median:.2%}); the longest run of consecutive "
              f"failures on a healthy instance was {longest} and healthy instances fail {h_rate:.2%}, so {k} in a "
              f"row almost never happens by chance (< {FALSE_EJECTIONS_MAX} per {INTERVAL_S}s interval at "
              f"~{per_interval:.0f} calls); Istio's {INTERVAL_S}s interval and {BASE_EJECTION_S}s ejection kept")
    warns = tuple(f"{i} never failed {k} times in a row in the window: consecutive-error detection would not "
                  "eject it (its failures are spread out)" for i, t in trips.items() if t == 0)
    return Recommendation("outlier", target, policy, Evidence(
        scope.label(), n, figures, confidence_from_n(int(bad["failed"].sum()), 20, 200), reason), warns)


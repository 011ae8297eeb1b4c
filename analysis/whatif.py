"""What-if: replay the recorded calls against a proposed policy, per route, with uncertainty.

- timeout: calls that would have been cut (and how many of those had succeeded);
- retry: transient failures, the ones a retry would likely have recovered and the
  retries it would have sent, from P(success on retry) estimated as in
  analysis.retries, with a 95% Wilson interval on that probability;
- circuit breaker: requests that would have met an ejected instance. The
  replay works on INTERVAL buckets: a bucket with at least `consecutive`
  failures making at least half its calls trips the instance, which stays
  ejected for the following base_ejection_s; its calls in that time are
  counted as rejected (sent elsewhere by the load balancer).
"""
from __future__ import annotations

import math

import pandas as pd

from analysis.evidence import wilson
from analysis.retries import expected_recovered, expected_retries_sent, retry_frame
from analysis.scope import FAILED_SQL, HEALTHY_SQL, Scope
from analysis.window import quote


def _callee(callee: str | None) -> str:
    return f"dst_service = {quote(callee)}" if callee else "1"


def timeout_whatif(scope: Scope, timeout_s: float, callee: str | None = None) -> pd.DataFrame:
    """Per caller → callee route: calls, calls longer than the timeout, and how many of those succeeded."""
    t = int(round(timeout_s * 1e9))
    sql = f"""SELECT caller, toString(dst_service) AS callee, toString(method) AS method, route_t AS route,
       count() AS n, countIf(duration_ns > {t}) AS cut, countIf(duration_ns > {t} AND {HEALTHY_SQL}) AS cut_ok
FROM {scope.calls()} WHERE {_callee(callee)} GROUP BY caller, callee, method, route ORDER BY caller, callee, route"""
    df = scope.frame(sql)
    df["cut_share"] = df["cut"] / df["n"]
    bounds = [wilson(int(k), int(n)) for k, n in zip(df["cut"], df["n"])]
    df["cut_share_lo"] = [b[0] for b in bounds]
    df["cut_share_hi"] = [b[1] for b in bounds]
    return df


def retry_whatif(scope: Scope, attempts: int, callee: str | None = None) -> pd.DataFrame:
    """Per caller → callee route: transient failures, expected recoveries and extra calls, with 95% ranges."""
    df = retry_frame(scope)
    if callee:
        df = df[df["callee"] == callee].reset_index(drop=True)
    rows = []
    for r in df.itertuples():
        p = float(r.p_retry) if r.informed else math.nan
        lo, hi = wilson(round(p * r.informed), int(r.informed)) if r.informed else (0.0, 1.0)
        f = int(r.transient)
        rows.append({"caller": r.caller, "callee": r.callee, "method": r.method, "route": r.route, "n": int(r.n),
                     "transient_failures": f, "p_success_on_retry": p,
                     "recovered": expected_recovered(f, p, attempts) if r.informed else math.nan,
                     "recovered_lo": expected_recovered(f, lo, attempts),
                     "recovered_hi": expected_recovered(f, hi, attempts),
                     "retries_sent": expected_retries_sent(f, p, attempts) if r.informed else math.nan,
                     "extra_load_share": expected_retries_sent(f, p, attempts) / r.n if r.informed else math.nan})
    return pd.DataFrame(rows)


def breaker_whatif(scope: Scope, consecutive: int, interval_s: int = 10, base_ejection_s: int = 30,
                   callee: str | None = None) -> pd.DataFrame:
    """Per instance: calls, intervals that trip the breaker, and calls that would have been rejected."""
    span = math.ceil(base_ejection_s / interval_s)
    sql = f"""SELECT callee, instance, sum(bn) AS n, countIf(trip) AS trips,
       sumIf(bn, arrayExists(t -> t < b AND b <= t + {span}, tripped)) AS rejected
FROM (SELECT *, groupArrayIf(b, trip) OVER (PARTITION BY callee, instance) AS tripped
      FROM (SELECT toString(dst_service) AS callee, instance,
                   intDiv(toUnixTimestamp64Nano(time), {int(interval_s) * 10**9}) AS b, count() AS bn,
                   countIf({FAILED_SQL}) AS bf, bf >= {int(consecutive)} AND bf * 2 >= bn AS trip
            FROM {scope.calls()} WHERE dst_port != 0 AND {_callee(callee)} GROUP BY callee, instance, b))
GROUP BY callee, instance ORDER BY callee, instance"""
    df = scope.frame(sql)
    df["rejected_share"] = df["rejected"] / df["n"]
    return df

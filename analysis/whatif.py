"""What-if: replay the recorded calls against a proposed policy, per route, with uncertainty.

- timeout: calls that would have been cut (and how many of those had succeeded);
- retry: transient failures, the ones a retry would likely have recovered and the
  retries it would have sent, from P(success on retry) estimated as in
  analysis.retries, with a 95% Wilson interval on that probability;
- timeout curve: calls cut for a list of timeout values, in one pass;
- circuit breaker: calls that an ejected instance would not have received,
  replayed call by call in time order per instance (analysis.runs.breaker_replay_sql);
- for_recommendation: the one of these a recommendation's policy calls for, as the figures stored
  with it (`recommend --apply`) for its dry-run to be compared with.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from meshlens.analysis.evidence import Recommendation, wilson
from meshlens.analysis.outliers import BASE_EJECTION_S
from meshlens.analysis.retries import expected_recovered, expected_retries_sent, retry_frame
from meshlens.analysis.runs import breaker_replay_sql
from meshlens.analysis.scope import HEALTHY_SQL, Scope
from meshlens.analysis.window import quote


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


def timeout_curve(scope: Scope, timeouts_s: list[float], callee: str | None = None) -> pd.DataFrame:
    """Per caller → callee route and timeout value: calls cut and successful calls cut, all values in one pass.

    Long form (one row per route and value), ready to plot as "calls cut vs timeout".
    """
    ts = "[" + ", ".join(str(int(round(t * 1e9))) for t in timeouts_s) + "]"
    sql = f"""SELECT caller, toString(dst_service) AS callee, toString(method) AS method, route_t AS route,
       count() AS n, sumForEach(arrayMap(t -> toUInt64(duration_ns > t), {ts})) AS cut,
       sumForEach(arrayMap(t -> toUInt64(duration_ns > t AND {HEALTHY_SQL}), {ts})) AS cut_ok
FROM {scope.calls()} WHERE {_callee(callee)} GROUP BY caller, callee, method, route ORDER BY caller, callee, route"""
    df = scope.frame(sql)
    rows = [{"caller": r.caller, "callee": r.callee, "method": r.method, "route": r.route, "n": int(r.n),
             "timeout_s": t, "cut": int(c), "cut_ok": int(ok), "cut_share": int(c) / int(r.n)}
            for r in df.itertuples() for t, c, ok in zip(timeouts_s, r.cut, r.cut_ok)]
    return pd.DataFrame(rows, columns=["caller", "callee", "method", "route", "n", "timeout_s", "cut", "cut_ok",
                                       "cut_share"])


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


def breaker_whatif(scope: Scope, consecutive: int, base_ejection_s: float = BASE_EJECTION_S,
                   callee: str | None = None, gateway: bool = False) -> pd.DataFrame:
    """Per instance: calls, failures, ejections (trips), calls that would have been rejected, and the
    failures among them, from a call-by-call replay of the consecutive-errors rule (analysis.runs)."""
    sql = breaker_replay_sql(scope.calls(), f"dst_port != 0 AND {_callee(callee)}", consecutive, base_ejection_s,
                             gateway)
    df = scope.frame(sql)
    df["rejected_share"] = df["rejected"] / df["n"]
    return df


def for_recommendation(scope: Scope, rec: Recommendation) -> dict[str, Any]:
    """What the recorded calls say `rec`'s policy would have done on them: the estimate a dry-run is checked
    against (analysis.dryrun). Empty when the policy changes nothing a call could show (none, a pool, mTLS)."""
    p, t = rec.policy, rec.target
    if p is None:
        return {}
    key = (t.get("caller"), t.get("method"), t.get("route"))

    def row(df: pd.DataFrame) -> Any:
        found = df[(df["caller"] == key[0]) & (df["method"] == key[1]) & (df["route"] == key[2])]
        return found.iloc[0] if len(found) else None

    if rec.kind == "timeout":
        r = row(timeout_whatif(scope, p["timeout_s"], t["callee"]))
        return {} if r is None else {"n": int(r.n), "cut": int(r.cut), "cut_ok": int(r.cut_ok),
                                     "cut_share": float(r.cut_share)}
    if rec.kind == "retry":
        r = row(retry_whatif(scope, p["attempts"], t["callee"]))
        if r is None:
            return {}
        return {"n": int(r.n), "transient_failures": int(r.transient_failures),
                **{k: round(float(getattr(r, k)), 4) for k in ("recovered", "recovered_lo", "recovered_hi",
                                                                 "retries_sent", "extra_load_share")}}
    if rec.kind == "outlier":
        df = breaker_whatif(scope, p["consecutive5xxErrors"] or p["consecutiveGatewayErrors"], callee=t["callee"],
                            gateway=not p["consecutive5xxErrors"])
        return {"n": int(df["n"].sum()), "ejections": int(df["trips"].sum()), "rejected": int(df["rejected"].sum()),
                "rejected_failed": int(df["rejected_failed"].sum()),
                "instances": [{"instance": str(r.instance), "n": int(r.n), "failed": int(r.failed),
                               "trips": int(r.trips), "rejected": int(r.rejected),
                               "rejected_failed": int(r.rejected_failed)} for r in df.itertuples()]}
    return {}

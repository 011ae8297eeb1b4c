"""Timeouts per caller → callee route, from the tail of successful latency with headroom.

Rule: timeout = max(p99.9 of healthy calls × HEADROOM, slowest healthy call),
rounded up — so it never cuts a call that succeeded in the window. Long-poll
and streaming routes (named like one, a websocket upgrade, a median of
LONG_POLL_MIN_S or more, or a bimodal tail) are recognised and left alone.
"""
from __future__ import annotations

import pandas as pd

from meshlens.analysis.evidence import (Evidence, Recommendation, confidence_from_n, not_enough, quantile_confidence,
                               round_up_ms)
from meshlens.analysis.route_stats import route_stats
from meshlens.analysis.scope import Scope

# p99.9 from fewer than 1,000 healthy calls is the maximum in disguise.
TIMEOUT_MIN_N = 1000
# 50% above the observed p99.9: Google SRE-style slack for a slower day without
# approaching the point where a hung upstream holds the caller for long.
HEADROOM = 1.5
# Envoy's and Istio's own timeouts for streams are off; a median this long is a long poll.
LONG_POLL_MIN_S = 30.0
# p90 this many times the median: two populations (e.g. quick answers and held polls).
BIMODAL_RATIO = 20.0


def timeout_frame(scope: Scope) -> pd.DataFrame:
    """Per caller → callee, method, route: healthy latency figures (seconds) and whether it streams."""
    return route_stats(scope)


def streaming_reason(row: pd.Series) -> str:
    """Why a route is treated as long-poll/streaming, or '' when it is not."""
    if row["stream_name"]:
        return f"route {row['route']} is named like a stream or watch"
    if row["upgraded"]:
        return "calls upgrade to a websocket or raw TCP stream"
    if row["p50_s"] >= LONG_POLL_MIN_S:
        return f"median call lasts {row['p50_s']:.0f}s (long poll)"
    if row["ok"] >= 20 and row["p50_s"] > 0 and row["p90_s"] > BIMODAL_RATIO * row["p50_s"]:
        return f"bimodal latency: p90 {row['p90_s'] * 1000:.0f}ms is over {BIMODAL_RATIO:.0f}× the median"
    return ""


def recommend_timeouts(scope: Scope, frame: pd.DataFrame | None = None) -> list[Recommendation]:
    df = timeout_frame(scope) if frame is None else frame
    out = []
    for _, r in df.iterrows():
        target = {"caller": r["caller"], "callee": r["callee"], "method": r["method"], "route": r["route"]}
        ok = int(r["ok"])
        stream = streaming_reason(r)
        if stream:
            ev = Evidence(scope.label(), int(r["n"]), {"p50_s": r["p50_s"], "max_ok_s": r["max_ok_s"]}, "high",
                          f"left alone: {stream}; a timeout would cut healthy long-lived calls")
            out.append(Recommendation("timeout", target, None, ev))
            continue
        if ok < TIMEOUT_MIN_N:
            out.append(Recommendation("timeout", target, None,
                                      not_enough(scope.label(), ok, TIMEOUT_MIN_N, "successful calls")))
            continue
        timeout = round_up_ms(max(r["p999_s"] * HEADROOM, r["max_ok_s"]))
        figures = {"healthy_n": ok, "p99_s": round(r["p99_s"], 6), "p999_s": round(r["p999_s"], 6),
                   "max_ok_s": round(r["max_ok_s"], 6), "headroom": HEADROOM}
        conf = min(confidence_from_n(ok, 1000, 10000), quantile_confidence(ok, 0.999), key=_rank)
        reason = (f"p99.9 of {ok} successful calls is {r['p999_s'] * 1000:.0f}ms and the slowest "
                  f"{r['max_ok_s'] * 1000:.0f}ms; {timeout * 1000:.0f}ms leaves {HEADROOM}× headroom over p99.9 "
                  "and cuts no call that succeeded")
        out.append(Recommendation("timeout", target, {"timeout_s": timeout}, Evidence(scope.label(), ok, figures,
                                                                                     conf, reason)))
    return out


def _rank(c: str) -> int:
    return ["none", "low", "medium", "high"].index(c)


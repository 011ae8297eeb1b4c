"""Retries where they help and are safe, with the estimate of what a retry would meet.

Safe: an idempotent method (RFC 9110 §9.2.2: GET HEAD OPTIONS TRACE PUT DELETE),
or a request carrying an idempotency key — the `idempotency-key` or
`x-idempotency-key` entry of the call's `attributes` (the IETF
httpapi-idempotency-key-header draft's header, as the proxy records it).

gRPC has no idempotent verbs (every call is a POST), so safety is not read from
the method: a gRPC call is retried only on what the server did not process
(route_stats.GRPC_TRANSIENT_SQL: UNAVAILABLE before any response message, a
refused stream, a failed connection), as gRPC's own retry design (gRFC A6) and
Envoy's `retryOn: unavailable` do. The other codes are not retried, key or no
key: a key would make a second try safe but not useful (GRPC_NOT_RETRIED says
why for each), and no producer records a gRPC call's metadata, so there is no
key to read (nor the method's `idempotency_level`, which lives in its .proto).

Helps: the failures are transient (route_stats.TRANSIENT_SQL: refused/reset/connect
failures, 502/503/504 — not timeouts, whose retries add load to what is
already slow) and independent. Independence is measured, not assumed: a
retry meets what the other calls of the same route met around the same
time, so for each transient failure the chance that a retry succeeds is
estimated as the success share of the *other* calls of that caller → route
in the same RETRY_WINDOW_S bucket. Independent failures (a blip on one
instance) give a high share; a persistent outage (every call failing for
minutes) gives ~0 and no retry is recommended.
"""
from __future__ import annotations


import pandas as pd

from meshlens.analysis.evidence import Evidence, Recommendation, confidence_from_n, not_enough, wilson
from meshlens.analysis.route_stats import IDEMPOTENCY_KEYS, RETRY_WINDOW_S, route_stats
from meshlens.analysis.scope import Scope
from meshlens.collector.spans import GRPC_NAMES

IDEMPOTENT_METHODS: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
RETRY_MIN_N = 500          # calls on the route before judging it at all
RETRY_MIN_FAILURES = 20    # transient failures with neighbours before estimating P(success on retry)
P_RETRY_MIN = 0.5          # below this, failures come in runs: a retry mostly fails again
KEYED_MIN_SHARE = 0.99     # share of a non-idempotent route's calls that must carry a key
RESIDUAL_TARGET = 0.01     # attempts are added until this share of transient failures remains
MAX_ATTEMPTS = 3
# Envoy retryOn conditions for the transient classes above; gateway-error is 502, 503 and 504.
RETRY_ON = "connect-failure,refused-stream,reset,gateway-error"
# Envoy's x-envoy-retry-grpc-on word for UNAVAILABLE, beside the retry-on words of what never reached the server.
GRPC_RETRY_ON = "connect-failure,refused-stream,unavailable"
GRPC_SAFE = "gRPC has no idempotent verbs: retried only on UNAVAILABLE (14), which the server did not process"
# Why a gRPC call answered each code is not retried (Envoy could: cancelled, deadline-exceeded, internal,
# resource-exhausted); UNAVAILABLE is retried only before any response message (route_stats). CANCELLED and
# RESOURCE_EXHAUSTED are no failures (as 499 and 429 are not), but Istio's default retries CANCELLED.
GRPC_NOT_RETRIED: dict[int, str] = {
    1: "the call was cancelled: the caller gave up, or the server stopped mid-way",
    2: "the server may have done the work",
    4: "the work may have been done, and a retry adds load to what is already slow",
    8: "the server or a quota is out of capacity: a retry adds to the load",
    12: "the method is not implemented: it fails again",
    13: "an internal error is a bug: it fails again",
    14: "UNAVAILABLE after a response message: the server had started, and it is too late to retry",
    15: "data was lost: a retry cannot recover it",
}
# Envoy's default retry budget: retries may be at most 20% of active requests (min 3 concurrent).
BUDGET_PERCENT = 20


def retry_frame(scope: Scope) -> pd.DataFrame:
    """Per caller → callee, method, route: failures, transient ones, and P(success on retry) figures."""
    return route_stats(scope)


def attempts_for(p: float) -> int:
    """Fewest retries leaving at most RESIDUAL_TARGET of transient failures unrecovered."""
    for a in range(1, MAX_ATTEMPTS + 1):
        if (1 - p) ** a <= RESIDUAL_TARGET:
            return a
    return MAX_ATTEMPTS


def recommend_retries(scope: Scope, per_try: dict[tuple[str, str, str, str], float] | None = None,
                      depth: dict[str, int] | None = None,
                      frame: pd.DataFrame | None = None) -> list[Recommendation]:
    """One recommendation per caller → callee route; `per_try` maps that key to a recommended timeout (s)."""
    df = retry_frame(scope) if frame is None else frame
    per_try = per_try or {}
    out: list[Recommendation] = []
    for _, r in df.iterrows():
        key = (r["caller"], r["callee"], r["method"], r["route"])
        target = dict(zip(("caller", "callee", "method", "route"), key))
        n, transient, informed = int(r["n"]), int(r["transient"]), int(r["informed"])
        grpc = bool(r["grpc"])
        idempotent = r["method"].upper() in IDEMPOTENT_METHODS
        keyed = n > 0 and r["keyed"] / n >= KEYED_MIN_SHARE
        figures = {"n": n, "failed": int(r["failed"]), "transient": transient, "keyed": int(r["keyed"])}
        kept = {c: k for c, k in sorted(r["grpc_not_transient"].items()) if c in GRPC_NOT_RETRIED}
        if grpc:
            figures["grpc_not_retried"] = {GRPC_NAMES.get(c, str(c)): k for c, k in kept.items()}
        if n < RETRY_MIN_N:
            out.append(Recommendation("retry", target, None, not_enough(scope.label(), n, RETRY_MIN_N, "calls")))
            continue
        not_retried = "; ".join(f"{k} {GRPC_NAMES[c]} ({c}): {GRPC_NOT_RETRIED[c]}" for c, k in kept.items())
        if grpc and transient == 0:
            reason = (f"no retries: {not_retried}; {GRPC_SAFE}" if not_retried else
                      "no retries needed: no retry-safe failures (UNAVAILABLE before a response, refused streams, "
                      f"failed connections) in the window; {GRPC_SAFE}")
            if 1 in kept:  # Istio's default policy (and the sidecar's) retries `cancelled`: turned off here
                figures["retries_off"] = True
                reason += "; Istio's default retries CANCELLED, so retries are turned off (attempts: 0)"
            out.append(Recommendation("retry", target, None, Evidence(
                scope.label(), n, figures, confidence_from_n(n, RETRY_MIN_N, 10 * RETRY_MIN_N), reason)))
            continue
        if not grpc and not idempotent and not keyed:
            reason = (f"no retries: {r['method']} is not idempotent and {int(r['keyed'])} of {n} calls carry an "
                      f"idempotency key ({'/'.join(IDEMPOTENCY_KEYS)}); a retry could apply the request twice")
            warn = (f"non-idempotent route {r['method']} {r['route']}: {transient} transient failures "
                    "are not retried; add an idempotency key to make retries safe",) if transient else ()
            figures["retries_off"] = True
            out.append(Recommendation("retry", target, None, Evidence(scope.label(), n, figures, "high", reason),
                                      warn))
            continue
        if transient == 0:
            out.append(Recommendation("retry", target, None, Evidence(
                scope.label(), n, figures, confidence_from_n(n, RETRY_MIN_N, 10 * RETRY_MIN_N),
                "no retries needed: no transient failures (refused, reset, 502/503/504) in the window")))
            continue
        if informed < RETRY_MIN_FAILURES:
            out.append(Recommendation("retry", target, None, not_enough(
                scope.label(), informed, RETRY_MIN_FAILURES, "transient failures with other calls nearby")))
            continue
        p = float(r["p_retry"])
        lo, hi = wilson(round(p * informed), informed)
        figures |= {"p_success_on_retry": round(p, 4), "p_interval_95": [round(lo, 4), round(hi, 4)],
                    "window_s": RETRY_WINDOW_S}
        conf = confidence_from_n(informed, RETRY_MIN_FAILURES, 10 * RETRY_MIN_FAILURES)
        if p < P_RETRY_MIN:
            figures["retries_off"] = True
            out.append(Recommendation("retry", target, None, Evidence(
                scope.label(), n, figures, conf,
                f"no retries: failures are persistent — only {p:.0%} of other calls around a failure succeeded, "
                "so a retry would mostly fail again and add load")))
            continue
        attempts = attempts_for(p)
        policy = {"attempts": attempts, "retryOn": GRPC_RETRY_ON if grpc else RETRY_ON,
                  "budget_percent": BUDGET_PERCENT}
        if key in per_try:
            policy["perTryTimeout_s"] = per_try[key]
        extra = transient / n * sum((1 - p) ** i for i in range(attempts))
        figures["extra_load_share"] = round(extra, 5)
        why = GRPC_SAFE if grpc else "idempotent method" if idempotent else "requests carry an idempotency key"
        reason = (f"{transient} transient failures of {n} calls ({transient / n:.2%}); {p:.0%} of other calls "
                  f"around them succeeded, so {attempts} attempt(s) would recover ~{1 - (1 - p) ** attempts:.1%} "
                  f"of them for {extra:.2%} extra load; safe: {why}")
        if not_retried:
            reason += f"; not retried: {not_retried}"
        out.append(Recommendation("retry", target, policy, Evidence(scope.label(), n, figures, conf, reason)))
    return _amplification(out, depth or {})


def _amplification(recs: list[Recommendation], depth: dict[str, int]) -> list[Recommendation]:
    """Warn where the callee retries its own calls too: attempts multiply down the chain."""
    retrying: dict[str, list[tuple[str, int]]] = {}
    for r in recs:
        if r.policy:
            retrying.setdefault(r.target["caller"], []).append((r.target["callee"], r.policy["attempts"]))
    out = []
    for r in recs:
        if r.policy:
            callee, a = r.target["callee"], r.policy["attempts"]
            below = retrying.get(callee, [])
            warns = list(r.warnings)
            if below:
                worst = max(b for _, b in below)
                names = ", ".join(sorted({c for c, _ in below}))
                warns.append(f"retry amplification: {callee} itself retries calls to {names}; one failure deep "
                             f"down can cost up to {(1 + a) * (1 + worst)} calls — retry at one layer only")
            elif depth.get(callee, 0) >= 2:
                warns.append(f"{callee} sits on a call chain {depth[callee]} deep: keep retries at one layer")
            r = Recommendation(r.kind, r.target, r.policy, r.evidence, tuple(warns))
        out.append(r)
    return out


def expected_recovered(failures: int, p: float, attempts: int) -> float:
    return failures * (1 - (1 - p) ** attempts)


def expected_retries_sent(failures: int, p: float, attempts: int) -> float:
    return failures * sum((1 - p) ** i for i in range(attempts))



"""mTLS readiness per destination service: who calls it over TLS, who in plaintext, who has no sidecar.

A caller is meshed when it appears as the `client` observer of some call in the
window (its own sidecar recorded it). A caller seen only by the tap (`wire`)
or by the callee's sidecar (`server`) has no sidecar: under STRICT its
plaintext calls would be refused. Verdicts:

- STRICT-ready: every caller is meshed and already uses TLS;
- PERMISSIVE first: every caller is meshed, some still send plaintext;
- blocked by <callers>: the named callers have no sidecar;
- not enough data (n=…): fewer than MTLS_MIN_N inbound calls, whatever the callers look like.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from meshlens.analysis.evidence import Evidence, Recommendation, confidence_from_n, not_enough
from meshlens.analysis.scope import Scope
from meshlens.analysis.window import CALLER_SQL

# Inbound calls to a service before any verdict. A caller that calls a few times an hour (a cron job, a
# batch) is exactly the one STRICT would break, and with fewer than 100 calls in the window such a
# caller is likely to be missing from it altogether; below this the answer is "not enough data".
MTLS_MIN_N = 100


def caller_frame(scope: Scope) -> pd.DataFrame:
    """Per callee and caller (one observer per edge): calls, TLS and plaintext calls, meshed or not."""
    w = scope.window.where()
    sql = f"""SELECT toString(dst_service) AS callee, caller, any(toString(observer)) AS observer, count() AS n,
       countIf(tls) AS tls_n, countIf(NOT tls) AS plain_n, maxIf(time, NOT tls) AS last_plain,
       caller IN (SELECT DISTINCT {CALLER_SQL} FROM calls WHERE {w} AND observer = 'client') AS meshed,
       callee IN (SELECT DISTINCT toString(dst_service) FROM calls WHERE {w} AND observer = 'server'
                  UNION ALL SELECT DISTINCT toString(src_service) FROM calls WHERE {w} AND observer = 'client')
           AS callee_meshed
FROM {scope.calls()} GROUP BY callee, caller ORDER BY callee, caller"""
    return scope.frame(sql)


def verdict(g: pd.DataFrame) -> tuple[str, str, list[str]]:
    """(verdict, PeerAuthentication mode, blocking callers) for one callee's callers."""
    blockers = sorted(g.loc[~g["meshed"].astype(bool), "caller"])
    if blockers:
        return f"blocked by {', '.join(blockers)}", "PERMISSIVE", blockers
    if int(g["plain_n"].sum()):
        return "PERMISSIVE first", "PERMISSIVE", []
    return "STRICT-ready", "STRICT", []


def recommend_mtls(scope: Scope, frame: pd.DataFrame | None = None) -> list[Recommendation]:
    """One verdict per destination service, or the honest refusal when it has too few inbound calls."""
    df = caller_frame(scope) if frame is None else frame
    out = []
    for callee, g in df.groupby("callee", sort=True):
        n = int(g["n"].sum())
        target = {"callee": str(callee)}
        v, mode, blockers = verdict(g)
        figures = {"callers": {r.caller: {"n": int(r.n), "tls": int(r.tls_n), "plaintext": int(r.plain_n),
                                          "meshed": bool(r.meshed), "seen_by": r.observer} for r in g.itertuples()},
                   "blockers": blockers, "verdict": v}
        if n < MTLS_MIN_N:
            out.append(Recommendation("mtls", target, None, not_enough(
                scope.label(), n, MTLS_MIN_N, "inbound calls", figures)))
            continue
        plain = sorted(g.loc[g["plain_n"] > 0, "caller"])
        if blockers:
            reason = (f"{', '.join(blockers)} {'has' if len(blockers) == 1 else 'have'} no sidecar (seen only by "
                      "the tap, its own spans or the callee's sidecar); STRICT would refuse their plaintext calls")
        elif plain:
            reason = (f"every caller is meshed but {', '.join(plain)} still send(s) plaintext: enable PERMISSIVE, "
                      "then STRICT once plaintext is gone")
        else:
            reason = f"all {len(g)} caller(s) are meshed and every one of {n} calls used TLS"
        warns = () if bool(g["callee_meshed"].iloc[0]) else (
            f"{callee} has no sidecar of its own in the records: a PeerAuthentication cannot be enforced there yet",)
        out.append(Recommendation("mtls", target, {"mode": mode, "verdict": v}, Evidence(
            scope.label(), n, figures, confidence_from_n(n, MTLS_MIN_N, 10 * MTLS_MIN_N), reason), warns))
    return out


@dataclass(frozen=True)
class Readiness:
    """Who would break if `service` went STRICT now, and the order of a rollout that breaks no one."""

    service: str
    verdict: str
    callers: list[dict[str, Any]]
    """Each caller: name (a service, or the address of one with no sidecar), calls, mtls, plaintext, sidecar,
    last plaintext call (UTC, ISO), seen by (the observer)."""
    would_break: list[str]
    """Callers with plaintext calls in the window: STRICT refuses them."""
    steps: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "verdict": self.verdict, "callers": self.callers,
                "would_break": self.would_break, "steps": self.steps}


def readiness(scope: Scope, frame: pd.DataFrame | None = None) -> list[Readiness]:
    """For every destination service in scope (one observer per edge): its callers, who sends plaintext, and the
    safe order: each client's traffic mTLS first (callers without a sidecar get one; the service's instances
    labelled so that meshed callers originate mTLS), then STRICT in dry-run, and enforced last, when dry-run's
    would_refuse_plaintext rows are none (Istio users who switch the server first break their callers)."""
    df = caller_frame(scope) if frame is None else frame
    out = []
    for callee, g in df.groupby("callee", sort=True):
        callers = []
        for r in g.itertuples():
            last = pd.Timestamp(r.last_plain) if int(r.plain_n) else None
            callers.append({"caller": str(r.caller), "calls": int(r.n), "mtls": int(r.tls_n),
                            "plaintext": int(r.plain_n), "sidecar": bool(r.meshed), "seen_by": str(r.observer),
                            "last_plaintext": last.strftime("%Y-%m-%dT%H:%M:%SZ") if last is not None else None})
        v, _, blockers = verdict(g)
        breaking = [c["caller"] for c in callers if c["plaintext"]]
        steps = []
        if blockers:
            steps.append(f"give {', '.join(blockers)} a sidecar (meshlens proxy): without one nothing can originate "
                         f"mTLS for {'it' if len(blockers) == 1 else 'them'}")
        meshed_plain = [c for c in breaking if c not in blockers]
        if meshed_plain:
            steps.append(f"have {', '.join(meshed_plain)} originate mTLS to {callee}: label {callee}'s instances "
                         "security.istio.io/tlsMode: istio in the mesh definition (Istio's auto mTLS), then check "
                         "their calls show tls and a peer_identity")
        steps.append(f"apply a STRICT PeerAuthentication for {callee} and put {callee} in dry-run: every "
                     "plaintext call is recorded would_refuse_plaintext and still served")
        steps.append(f"when no call to {callee} says would_refuse_plaintext, put {callee} in enforce: the server "
                     "goes STRICT last")
        out.append(Readiness(str(callee), v, callers, breaking, steps))
    return out

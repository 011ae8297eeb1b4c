"""Recommendations as Istio YAML: VirtualService, DestinationRule, PeerAuthentication, evidence as comments.

Field names follow istio/api (networking/v1alpha3 virtual_service.proto and
destination_rule.proto, security/v1beta1 peer_authentication.proto). Istio's
`retries.attempts` counts retries after the first try, as our `attempts` does.
Istio retries by default (2 attempts on connect-failure, refused-stream,
unavailable, cancelled and 503 — pilot's route/retry/retry.go), so a route
where retrying is unsafe or useless (not idempotent, or failing persistently) gets an
explicit `attempts: 0`. Routes are matched per
caller with `sourceLabels: {app: <caller>}`, assuming the usual `app` label.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import yaml

from meshlens.analysis.evidence import Recommendation, duration_text
from meshlens.analysis.recommend import Report
from meshlens.analysis.routes import PARAM


def uri_match(route: str) -> dict[str, str]:
    if PARAM not in route:
        return {"exact": route}
    parts = [re.escape(p) for p in route.split(PARAM)]
    return {"regex": "^" + "[^/]+".join(parts) + "$"}


def _comment(r: Recommendation, indent: str) -> list[str]:
    ev = r.evidence
    lines = [f"{r.kind}: {ev.reason}", f"evidence: window {ev.window}, n={ev.n}, confidence {ev.confidence}"]
    lines += [f"WARNING: {w}" for w in r.warnings]
    return [f"{indent}# {line}" for line in lines]


def _dump(obj: Any, indent: str) -> list[str]:
    text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False).rstrip("\n")
    return [indent + line for line in text.splitlines()]


def _virtual_service(callee: str, recs: list[Recommendation]) -> list[str]:
    by_route: dict[tuple, dict[str, Recommendation]] = defaultdict(dict)
    skipped = []
    for r in recs:
        key = (r.target["caller"], r.target["method"], r.target["route"])
        if r.policy is not None or r.evidence.figures.get("retries_off"):
            by_route[key][r.kind] = r
        else:
            skipped.append(f"# {r.kind} {r.target['caller']} -> {r.target['method']} {r.target['route']}: "
                           f"{r.evidence.reason}")
    # Written line by line so that each http route can carry its evidence as comments.
    lines = ["apiVersion: networking.istio.io/v1beta1", "kind: VirtualService", "metadata:", f"  name: {callee}",
             "spec:", "  hosts:", f"  - {callee}", "  http:"]
    for (caller, method, route), kinds in sorted(by_route.items()):
        entry: dict[str, Any] = {"match": [{"uri": uri_match(route), "method": {"exact": method},
                                            "sourceLabels": {"app": caller}}]}
        t, rt = kinds.get("timeout"), kinds.get("retry")
        timeout = t.policy["timeout_s"] if t else None
        if rt is not None and rt.policy is None:
            entry["retries"] = {"attempts": 0}
        elif rt is not None:
            retries: dict[str, Any] = {"attempts": rt.policy["attempts"]}
            if "perTryTimeout_s" in rt.policy:
                retries["perTryTimeout"] = duration_text(rt.policy["perTryTimeout_s"])
                # The route timeout bounds all tries together.
                timeout = max(timeout or 0.0, rt.policy["perTryTimeout_s"] * (1 + rt.policy["attempts"]))
            retries["retryOn"] = rt.policy["retryOn"]
            entry["retries"] = retries
        if timeout:
            entry["timeout"] = duration_text(timeout)
        entry["route"] = [{"destination": {"host": callee}}]
        for r in kinds.values():
            lines += _comment(r, "  ")
        lines += _dump([entry], "  ")
    lines += ["  - route:", "    - destination:", f"        host: {callee}"]
    return skipped + lines


def _destination_rule(callee: str, outlier: Recommendation | None, pool: Recommendation | None) -> list[str]:
    policy: dict[str, Any] = {}
    notes = []
    for r in (pool, outlier):
        if r is None:
            continue
        if r.policy is None:
            notes.append(f"# {r.kind}: {r.evidence.reason}")
        else:
            notes += _comment(r, "")
    if pool is not None and pool.policy is not None:
        policy["connectionPool"] = pool.policy
    if outlier is not None and outlier.policy is not None:
        policy["outlierDetection"] = {k: v for k, v in outlier.policy.items() if k != "eject"}
        notes.append(f"# instances expected to be ejected: {', '.join(outlier.policy['eject'])}")
    if not policy:
        return notes
    doc = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule", "metadata": {"name": callee},
           "spec": {"host": callee, "trafficPolicy": policy}}
    return notes + _dump(doc, "")


def _peer_authentication(callee: str, r: Recommendation) -> list[str]:
    if r.policy is None:
        return [f"# mtls {callee}: {r.evidence.reason}"]
    doc = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": callee},
           "spec": {"selector": {"matchLabels": {"app": callee}}, "mtls": {"mode": r.policy["mode"]}}}
    return _comment(r, "") + _dump(doc, "")


def istio_yaml(report: Report) -> str:
    """All documents, one YAML stream, grouped by destination service."""
    per: dict[str, dict[str, list[Recommendation]]] = defaultdict(lambda: defaultdict(list))
    for r in report.recommendations:
        per[r.target["callee"]][r.kind].append(r)
    docs = [f"# meshlens recommendations for {report.window} (n={report.n} calls)"]
    for callee in sorted(per):
        k = per[callee]
        route_recs = k["timeout"] + k["retry"]
        if route_recs:
            docs.append("\n".join(_virtual_service(callee, route_recs)))
        dr = _destination_rule(callee, (k["outlier"] or [None])[0], (k["connection_pool"] or [None])[0])
        if dr:
            docs.append("\n".join(dr))
        if k["mtls"]:
            docs.append("\n".join(_peer_authentication(callee, k["mtls"][0])))
    return "\n---\n".join(docs) + "\n"

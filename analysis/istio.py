"""Recommendations as Istio YAML: VirtualService, DestinationRule, PeerAuthentication, evidence as comments.

Field names follow istio/api (networking/v1alpha3 virtual_service.proto and
destination_rule.proto, security/v1beta1 peer_authentication.proto). Istio's
`retries.attempts` counts retries after the first try, as our `attempts` does.
Istio retries by default (2 attempts on connect-failure, refused-stream,
unavailable, cancelled and 503 — pilot's route/retry/retry.go), so a route
where retrying is unsafe or useless (not idempotent, or failing persistently) gets an
explicit `attempts: 0`. Routes are matched per
caller with `sourceLabels: {app: <caller>}`, assuming the usual `app` label.

A gRPC route is its method path (`/package.Service/Method`, the `uri` matched
exactly), with no `method` match: every gRPC call is a POST. Its retries use
Envoy's gRPC `retryOn` words (`unavailable`) beside the HTTP ones
(analysis.retries).

Each route's `uri` match (analysis.uri_match: `exact` for a literal route, an
RE2 regex otherwise; both compared by Envoy with the path without its query
string) is checked against the paths recorded for that route before it is
written. Istio takes the first `http` entry that matches, so entries go from
the most specific match to the least (`/users/export` before `/users/:id`). A
route whose calls carried no path, or whose template does not match its
recorded paths, gets a comment instead of an entry: a guessed match would
either do nothing or catch other routes' requests.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import yaml

from meshlens.analysis.evidence import Recommendation, duration_text
from meshlens.analysis.recommend import Report, RouteKey, summary
from meshlens.analysis.uri_match import precedence, unmatched, uri_match, with_trailing_slash


def checked_uri_match(route: str, paths: tuple[str, ...]) -> tuple[dict[str, str] | None, str]:
    """The uri match for `route` if it matches every recorded path in `paths`, else None and why not."""
    match = uri_match(route)
    if not paths:
        return None, (f"no path was recorded for route {route!r} (its calls carry the route only), so a uri match "
                      f"could only be guessed from the template ({_flow(match)}); none is written")
    missed = unmatched(match, paths)
    if missed:
        slash = with_trailing_slash(match)
        if not unmatched(slash, paths):
            return slash, ""
        return None, (f"{_flow(match)}, translated from route {route!r}, does not match {len(missed)} of the "
                      f"{len(paths)} recorded paths checked (e.g. {missed[0]!r}); none is written")
    return match, ""


def _flow(match: dict[str, str]) -> str:
    return yaml.safe_dump(match, default_flow_style=True, width=10**6).strip()


def _comment(r: Recommendation, indent: str) -> list[str]:
    ev = r.evidence
    lines = [f"{r.kind}: {ev.reason}", f"evidence: window {ev.window}, n={ev.n}, confidence {ev.confidence}"]
    lines += [f"WARNING: {w}" for w in r.warnings]
    return [f"{indent}# {line}" for line in lines]


def _dump(obj: Any, indent: str) -> list[str]:
    text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False).rstrip("\n")
    return [indent + line for line in text.splitlines()]


def http_entries(callee: str, recs: list[Recommendation], paths: dict[RouteKey, tuple[str, ...]]
                  ) -> tuple[list[str], list[tuple[dict[str, Any], list[Recommendation]]]]:
    """A VirtualService's `http` entries for `recs` (most specific match first), each with the recommendations
    it carries; and a comment for each recommendation that could not be written, saying why."""
    by_route: dict[tuple[str, str, str], dict[str, Recommendation]] = defaultdict(dict)
    skipped = []
    for r in recs:
        key = (r.target["caller"], r.target["method"], r.target["route"])
        if r.policy is not None or r.evidence.figures.get("retries_off"):
            by_route[key][r.kind] = r
        else:
            skipped.append(f"# {r.kind} {r.target['caller']} -> {r.target['method']} {r.target['route']}: "
                           f"{r.evidence.reason}")
    matches = {}
    for (caller, method, route), kinds in sorted(by_route.items()):
        match, why = checked_uri_match(route, paths.get((caller, callee, method, route), ()))
        if match is None:
            policies = ", ".join(summary(r) if r.policy else "retries off (attempts: 0)" for r in kinds.values())
            skipped.append(f"# {policies} for {caller} -> {method} {route}: {why}")
        else:
            matches[(caller, method, route)] = match
    entries = []
    for caller, method, route in sorted(matches, key=lambda k: (k[0], k[1], precedence(k[2]), k[2])):
        kinds = by_route[(caller, method, route)]
        match: dict[str, Any] = {"uri": matches[(caller, method, route)]}
        if not method.startswith("/"):  # a gRPC call's method is its method path, which the uri matches: its
            match["method"] = {"exact": method}  # :method is always POST (collector.record.Call.method)
        match["sourceLabels"] = {"app": caller}
        entry: dict[str, Any] = {"name": f"{caller} {method} {route}", "match": [match]}
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
        entries.append((entry, list(kinds.values())))
    return skipped, entries


def catch_all(callee: str) -> dict[str, Any]:
    """The last entry: every other call to the callee, as without the VirtualService."""
    return {"route": [{"destination": {"host": callee}}]}


def _virtual_service(callee: str, recs: list[Recommendation], paths: dict[RouteKey, tuple[str, ...]]) -> list[str]:
    skipped, entries = http_entries(callee, recs, paths)
    # Written line by line so that each http route can carry its evidence as comments.
    lines = ["apiVersion: networking.istio.io/v1beta1", "kind: VirtualService", "metadata:", f"  name: {callee}",
             "spec:", "  hosts:", f"  - {callee}", "  http:"]
    for entry, kinds in entries:
        for r in kinds:
            lines += _comment(r, "  ")
        lines += _dump([entry], "  ")
    lines += _dump([catch_all(callee)], "  ")
    return skipped + lines


def traffic_policy(outlier: Recommendation | None, pool: Recommendation | None) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    if pool is not None and pool.policy is not None:
        policy["connectionPool"] = pool.policy
    if outlier is not None and outlier.policy is not None:
        policy["outlierDetection"] = {k: v for k, v in outlier.policy.items() if k != "eject"}
    return policy


def _destination_rule(callee: str, outlier: Recommendation | None, pool: Recommendation | None) -> list[str]:
    notes = []
    for r in (pool, outlier):
        if r is None:
            continue
        if r.policy is None:
            notes.append(f"# {r.kind}: {r.evidence.reason}")
        else:
            notes += _comment(r, "")
    policy = traffic_policy(outlier, pool)
    if outlier is not None and outlier.policy is not None:
        notes.append(f"# instances expected to be ejected: {', '.join(outlier.policy['eject'])}")
    if not policy:
        return notes
    doc = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule", "metadata": {"name": callee},
           "spec": {"host": callee, "trafficPolicy": policy}}
    return notes + _dump(doc, "")


def peer_authentication_doc(callee: str, r: Recommendation) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": callee},
            "spec": {"selector": {"matchLabels": {"app": callee}}, "mtls": {"mode": r.policy["mode"]}}}


def _peer_authentication(callee: str, r: Recommendation) -> list[str]:
    if r.policy is None:
        return [f"# mtls {callee}: {r.evidence.reason}"]
    return _comment(r, "") + _dump(peer_authentication_doc(callee, r), "")


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
            docs.append("\n".join(_virtual_service(callee, route_recs, report.paths)))
        dr = _destination_rule(callee, (k["outlier"] or [None])[0], (k["connection_pool"] or [None])[0])
        if dr:
            docs.append("\n".join(dr))
        if k["mtls"]:
            docs.append("\n".join(_peer_authentication(callee, k["mtls"][0])))
    return "\n---\n".join(docs) + "\n"

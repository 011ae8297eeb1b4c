"""What `meshlens recommend --apply` stores for a service: its recommended policies as Istio documents, each
annotated with the evidence and the what-if behind it, and the service put in dry-run.

The annotations are what a dry-run report later compares the dry-run with (analysis.dryrun): what the
recorded calls said the policy would do (`meshlens.io/evidence`, one entry a recommendation, with its
what-if from analysis.whatif) and how the service's calls looked before (`meshlens.io/observed`).
Kubernetes annotations are strings: both are JSON.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from meshlens.analysis.evidence import Recommendation
from meshlens.analysis.istio import catch_all, http_entries, peer_authentication_doc, traffic_policy
from meshlens.analysis.mode_figures import by_mode
from meshlens.analysis.recommend import Report
from meshlens.analysis.scope import Scope
from meshlens.analysis.whatif import for_recommendation

__all__ = ["EVIDENCE", "KINDS", "OBSERVED", "RECOMMENDED", "Proposal", "evidence_of", "is_recommended", "observed_of", "proposals",
           "stored_for"]

KINDS = ("VirtualService", "DestinationRule", "PeerAuthentication")
"""What `recommend --apply` writes for a service, each named for it."""
RECOMMENDED = "meshlens.io/recommended"
"""Marks a document `recommend --apply` wrote (the window and sample it came from): it may replace it."""
EVIDENCE = "meshlens.io/evidence"
OBSERVED = "meshlens.io/observed"
ISTIO_V1BETA1 = "networking.istio.io/v1beta1"


@dataclass
class Proposal:
    """One service's documents (VirtualService, DestinationRule, PeerAuthentication: those with a policy)."""

    service: str
    namespace: str
    documents: list[dict[str, Any]] = field(default_factory=list)
    written: list[Recommendation] = field(default_factory=list)
    """The recommendations the documents carry."""
    skipped: list[str] = field(default_factory=list)
    """Why the others are not written (too little data, no match that fits the recorded paths, ...)."""


def proposals(report: Report, scope: Scope, namespaces: dict[str, str]) -> dict[str, Proposal]:
    """Per callee with a recommendation: its documents, in `namespaces[callee]` (the mesh's namespace of it)."""
    per: dict[str, dict[str, list[Recommendation]]] = defaultdict(lambda: defaultdict(list))
    for r in report.recommendations:
        per[r.target["callee"]][r.kind].append(r)
    out = {}
    for callee in sorted(per):
        k = per[callee]
        prop = out[callee] = Proposal(callee, namespaces.get(callee, "default"))
        observed = _observed(scope, callee)
        skipped, entries = http_entries(callee, k["timeout"] + k["retry"], report.paths)
        prop.skipped += [s.removeprefix("# ") for s in skipped]
        if entries:
            recs = [r for _, rs in entries for r in rs]
            prop.documents.append(_doc(prop, "VirtualService", {"hosts": [callee], "http": [
                e for e, _ in entries] + [catch_all(callee)]}, recs, scope, report, observed))
        outlier, pool = (k["outlier"] or [None])[0], (k["connection_pool"] or [None])[0]
        policy = traffic_policy(outlier, pool)
        recs = [r for r in (pool, outlier) if r is not None and r.policy is not None]
        prop.skipped += [f"{r.kind}: {r.evidence.reason}" for r in (pool, outlier) if r is not None and r.policy is None]
        if policy:
            prop.documents.append(_doc(prop, "DestinationRule", {"host": callee, "trafficPolicy": policy}, recs,
                                       scope, report, observed))
        for r in k["mtls"][:1]:
            if r.policy is None:
                prop.skipped.append(f"mtls: {r.evidence.reason}")
                continue
            pa = peer_authentication_doc(callee, r)
            prop.documents.append(_doc(prop, "PeerAuthentication", pa["spec"], [r], scope, report, observed,
                                       pa["apiVersion"]))
    return out


def _doc(prop: Proposal, kind: str, spec: dict[str, Any], recs: list[Recommendation], scope: Scope, report: Report,
         observed: dict[str, Any] | None, api_version: str = ISTIO_V1BETA1) -> dict[str, Any]:
    prop.written += recs
    evidence = [{"kind": r.kind, "target": r.target, "policy": r.policy,
                 "evidence": {"window": r.evidence.window, "n": r.evidence.n, "figures": r.evidence.figures,
                              "confidence": r.evidence.confidence, "reason": r.evidence.reason},
                 "whatif": for_recommendation(scope, r), "warnings": list(r.warnings)} for r in recs]
    annotations = {RECOMMENDED: json.dumps({"window": report.window, "n": report.n}),
                   EVIDENCE: json.dumps(evidence, default=str, sort_keys=True)}
    if observed is not None:
        annotations[OBSERVED] = json.dumps(observed, sort_keys=True)
    return {"apiVersion": api_version, "kind": kind,
            "metadata": {"name": prop.service, "namespace": prop.namespace, "annotations": annotations},
            "spec": spec}


def _observed(scope: Scope, callee: str) -> dict[str, Any] | None:
    """The callee's calls in observe over the recommendation's window, as callers saw them."""
    figures = by_mode(scope, callee).get("observe")
    return None if figures is None else {"window": scope.label(), **figures.as_dict()}


def is_recommended(doc: dict[str, Any]) -> bool:
    return RECOMMENDED in ((doc.get("metadata") or {}).get("annotations") or {})


def _annotation(doc: dict[str, Any], key: str) -> Any:
    """One of the JSON annotations `recommend --apply` writes, read back; None when absent or not JSON."""
    try:
        return json.loads(doc["metadata"]["annotations"][key])
    except (KeyError, TypeError, ValueError):
        return None


def evidence_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The recommendations a stored document carries (none for one written by hand)."""
    return _annotation(doc, EVIDENCE) or []


def observed_of(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The service's observe figures stored with its recommended documents (the first that has them)."""
    return next((o for o in (_annotation(d, OBSERVED) for d in docs) if o), None)


class Conflict(ValueError):
    """The proposal cannot be stored as it is: one line saying why and what to do."""


@dataclass
class Plan:
    """What one `recommend --apply` would store: documents (with the Mode switches) and a line per service."""

    documents: list[dict[str, Any]]
    said: list[str]


def plan(props: dict[str, Proposal], stored: dict[tuple[str, str], dict[str, Any]], modes: dict[str, str],
         services: set[str], mode_doc: Any) -> Plan:
    """`stored`: the control plane's documents by (kind, namespace/name); `modes`: each service's mode there;
    `services`: the stored Mesh's; `mode_doc(service, mode)`: the Mode document.

    A policy whose spec is already stored is left as it is (its evidence with it): re-applying the same
    recommendations changes nothing. A service whose policies change goes to dry-run, never straight to
    enforce (one already in enforce too: a changed policy is tried first); one in observe whose stored
    policies are the recommended ones goes to dry-run. Raises Conflict, and nothing is stored, for a service
    the mesh does not define, or a document of the same name written by hand."""
    unknown = sorted(s for s, p in props.items() if p.documents and s not in services)
    if unknown:
        raise Conflict(f"the control plane's mesh does not define {', '.join(unknown)} (its services: "
                       f"{', '.join(sorted(services)) or 'none: apply a Mesh first'}); nothing applied")
    docs: list[dict[str, Any]] = []
    said = []
    for service, p in sorted(props.items()):
        if not p.documents:
            continue
        changed = []
        for doc in p.documents:
            key = (doc["kind"], f"{p.namespace}/{service}")
            old = stored.get(key)
            if old is not None and not is_recommended(old):
                raise Conflict(f"{doc['kind']} {key[1]} is stored and was not written by meshlens recommend: "
                               f"merge by hand (meshlens recommend --service {service} --format yaml); "
                               f"nothing applied")
            if old is None or old.get("spec") != doc["spec"]:
                changed.append(doc)
        mode = modes.get(service, "observe")
        to = "dry-run" if changed or mode == "observe" else mode
        docs += changed
        if to != mode:
            docs.append(mode_doc(service, to))
        what = ", ".join(f"{d['kind']} {'created' if (d['kind'], f'{p.namespace}/{service}') not in stored else 'changed'}"
                         for d in changed) or "policies unchanged"
        said.append(f"{service}: {what}; mode {mode}" + (f" -> {to}" if to != mode else " (kept)"))
    return Plan(docs, said)


def stored_for(client: Any, service: str) -> list[dict[str, Any]]:
    """The documents of KINDS named for `service` in the control plane (`client`: a ControlClient): those
    `recommend --apply` wrote carry the evidence a dry-run report compares with."""
    return [item["doc"] for kind in KINDS for item in client.get(kind)["items"]
            if item["name"].rsplit("/", 1)[-1] == service]

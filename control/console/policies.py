"""Which stored policies name a service, and why each one does: read as the sidecars read them.

A VirtualService by its hosts and a DestinationRule by its host (Istio's short, namespaced and FQDN host names:
meshlens.policy.networking.service_of); a LocalRateLimit by its service; a PeerAuthentication or an
AuthorizationPolicy by where it sits and its selector (Istio's precedence, meshlens.policy.security): one that
selects the service's labels in its namespace, its namespace's without a selector, the root namespace's (mesh-wide).
"""
from __future__ import annotations

from typing import Any

import yaml

from meshlens.mesh import Service
from meshlens.policy.networking import service_of
from meshlens.policy.resources import Resource
from meshlens.policy.security import ROOT_NAMESPACE

__all__ = ["POLICY_KINDS", "naming"]

POLICY_KINDS = ("VirtualService", "DestinationRule", "PeerAuthentication", "AuthorizationPolicy", "LocalRateLimit")
_ONE_A_HOST = ("VirtualService", "DestinationRule")


def naming(resources: list[Resource], service: Service) -> list[dict[str, Any]]:
    """The policies among `resources` that apply to `service`: each with why, whether sidecars use it, its revision,
    its document and its YAML."""
    labels = {"app": service.name}
    for inst in service.instances:
        labels.update(inst.labels)
    out = []
    first: dict[str, str] = {}
    for r in sorted(resources, key=lambda r: (POLICY_KINDS.index(r.kind) if r.kind in POLICY_KINDS else 99, r.name)):
        why = _why(r, service.name, service.namespace, labels) if r.kind in POLICY_KINDS else None
        if not why:
            continue
        # one of each a host: sidecars use the first by namespace/name (proxy/policies.py), as Istio uses one
        in_force = r.kind not in _ONE_A_HOST or first.setdefault(r.kind, r.name) == r.name
        if not in_force:
            why += f"; not in force: sidecars use {first[r.kind]}, the first by namespace/name"
        out.append({"kind": r.kind, "name": r.name, "revision": r.revision, "why": why, "in_force": in_force,
                    "doc": r.doc, "yaml": yaml.safe_dump(r.doc, sort_keys=False, allow_unicode=True)})
    return out


def _why(r: Resource, name: str, namespace: str, labels: dict[str, str]) -> str | None:
    ns = r.name.split("/", 1)[0] if "/" in r.name else namespace
    spec = r.doc.get("spec") or {}
    if r.kind == "VirtualService":
        hosts = [h for h in spec.get("hosts") or () if service_of(h, ns)[0] == name]
        return f"routes calls to {', '.join(hosts)}" if hosts else None
    if r.kind == "DestinationRule":
        return f"traffic policy for host {spec['host']}" if service_of(spec.get("host", ""), ns)[0] == name else None
    if r.kind == "LocalRateLimit":
        return "rate-limits its inbound calls" if (spec.get("service") or r.name) == name else None
    selector = (spec.get("selector") or {}).get("matchLabels")
    if ns == namespace and selector:
        return f"selects it ({', '.join(f'{k}={v}' for k, v in selector.items())})" \
            if all(labels.get(k) == v for k, v in selector.items()) else None
    if ns == namespace:
        return f"namespace-wide ({namespace})"
    if ns == ROOT_NAMESPACE and not selector:
        return f"mesh-wide ({ROOT_NAMESPACE})"
    return None

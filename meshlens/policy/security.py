"""Istio's security API, checked as Istio reads it: PeerAuthentication and AuthorizationPolicy specs.

Both are enforced by the sidecars (proxy/authz.py, proxy/mtls.py): PeerAuthentication's
mode on the service's inbound side, AuthorizationPolicy on each request, with the mTLS
peer's verified identity. What they cannot evaluate is said with a warning (JWT, `when`
keys they do not know, CUSTOM). Fields
as Istio's security v1 protos name them (istio.io/latest/docs/reference/config/security).
Semantics checked: a mode is UNSET, DISABLE, PERMISSIVE or STRICT; portLevelMtls needs a
selector (Istio: "portLevelMtls requires selector"); an action is ALLOW, DENY, AUDIT or
CUSTOM, and CUSTOM names a provider while no other action does; a rule's `when` names a
key and values or notValues.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from meshlens.policy.spec import (UNSUPPORTED, SpecError, Where, enum, list_of, map_of, message, run, string,
                                   uint)

__all__ = ["CONDITION_KEYS", "ROOT_NAMESPACE", "check_authorization_policy", "check_peer_authentication",
           "peer_authentication"]

ROOT_NAMESPACE = "istio-system"  # Istio's default root namespace: its selector-less policies are mesh-wide

# The `when` keys the sidecar evaluates (proxy/authz.py condition_getter); request.headers[NAME] besides.
CONDITION_KEYS = ("source.ip", "remote.ip", "source.principal", "source.namespace", "source.serviceAccount",
                  "destination.port")


_SELECTOR = message({"matchLabels": map_of(string)})
_MTLS = message({"mode": enum("UNSET", "DISABLE", "PERMISSIVE", "STRICT")})
_PEER_AUTHENTICATION = message({"selector": _SELECTOR, "mtls": _MTLS, "portLevelMtls": map_of(_MTLS)})

_STRINGS = list_of(string)
_SOURCE = message({k: _STRINGS for k in (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
    "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts")})
_OPERATION = message({k: _STRINGS for k in (
    "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")})
_CONDITION = message({"key": string, "values": _STRINGS, "notValues": _STRINGS})
_RULE = message({"from": list_of(message({"source": _SOURCE})), "to": list_of(message({"operation": _OPERATION})),
                 "when": list_of(_CONDITION)})
_AUTHORIZATION_POLICY = message({
    "selector": _SELECTOR, "action": enum("ALLOW", "DENY", "AUDIT", "CUSTOM"), "provider": message({"name": string}),
    "rules": list_of(_RULE), "targetRef": UNSUPPORTED, "targetRefs": UNSUPPORTED,
})


def check_peer_authentication(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_PEER_AUTHENTICATION, spec)
    if spec.get("portLevelMtls") and not spec.get("selector"):
        raise SpecError(("portLevelMtls",), "needs a selector (Istio: portLevelMtls requires selector)")
    for port in spec.get("portLevelMtls") or {}:
        if not str(port).isdigit() or not 0 < int(port) < 65536:
            raise SpecError(("portLevelMtls", port), "keys are port numbers (1-65535)")
    return warnings


def check_authorization_policy(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_AUTHORIZATION_POLICY, spec)
    action = spec.get("action", "ALLOW")
    if (action == "CUSTOM") != ("provider" in spec):
        raise SpecError(("provider",) if "provider" in spec else ("action",),
                        "CUSTOM needs a provider, and only CUSTOM takes one")
    if action == "CUSTOM":
        warnings.append((("action",), "CUSTOM (an external authorizer) is stored and not evaluated by meshlens"))
    for i, rule in enumerate(spec.get("rules") or []):
        for j, src in enumerate(rule.get("from") or []):
            source = src.get("source") or {}
            for field in ("requestPrincipals", "notRequestPrincipals"):
                if field in source:
                    warnings.append((("rules", i, "from", j, "source", field),
                                     "JWT principals are not verified by meshlens: it never matches"))
            for field in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
                for k, block in enumerate(source.get(field) or []):
                    try:
                        ipaddress.ip_network(block, strict=False)
                    except ValueError:
                        raise SpecError(("rules", i, "from", j, "source", field, k),
                                        f"{block!r} is not an IP address or CIDR block") from None
        for j, cond in enumerate(rule.get("when") or []):
            if "key" not in cond or not ("values" in cond or "notValues" in cond):
                raise SpecError(("rules", i, "when", j), "needs a key, and values or notValues")
            key = cond["key"]
            if not (key in CONDITION_KEYS or (key.startswith("request.headers[") and key.endswith("]"))):
                warnings.append((("rules", i, "when", j, "key"), f"{key!r} is not a key meshlens evaluates (known: "
                                 f"request.headers[NAME], {', '.join(CONDITION_KEYS)}): it never matches"))
    return warnings


def peer_authentication(docs: list[tuple[str, dict[str, Any]]], namespace: str,
                        labels: dict[str, str]) -> tuple[str, dict[int, str]]:
    """The mTLS mode a workload's inbound side takes from PeerAuthentications ((namespace/name, doc) pairs), and its
    port-level modes. Istio's precedence: a policy selecting the workload in its namespace, else its namespace's
    without a selector, else the root namespace's (mesh-wide); UNSET (or no mode) takes the next level's; with
    nothing set, PERMISSIVE. Port-level modes come from the workload's own policy."""
    levels: list[dict[str, Any] | None] = [None, None, None]  # workload, namespace, mesh
    for name, doc in sorted(docs, key=lambda d: d[0]):
        ns = name.split("/", 1)[0]
        spec = doc.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels")
        if ns == namespace and selector and all(labels.get(k) == v for k, v in selector.items()):
            levels[0] = levels[0] or spec
        elif ns == namespace and not selector:
            levels[1] = levels[1] or spec
        elif ns == ROOT_NAMESPACE and not selector:
            levels[2] = levels[2] or spec
    mode = "PERMISSIVE"
    for spec in reversed(levels):  # mesh, then namespace, then workload: each set mode overrides
        chosen = ((spec or {}).get("mtls") or {}).get("mode", "UNSET")
        if chosen != "UNSET":
            mode = chosen
    ports = {int(p): m.get("mode", "UNSET") for p, m in ((levels[0] or {}).get("portLevelMtls") or {}).items()}
    return mode, {p: (m if m != "UNSET" else mode) for p, m in ports.items()}

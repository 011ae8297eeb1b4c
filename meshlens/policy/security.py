"""Istio's security API, checked as Istio reads it: PeerAuthentication and AuthorizationPolicy specs.

Stored and checked here; enforced by the sidecar with mTLS (the next stage of work), so
until then every apply of one says, with a warning, that it is not enforced yet. Fields
as Istio's security v1 protos name them (istio.io/latest/docs/reference/config/security).
Semantics checked: a mode is UNSET, DISABLE, PERMISSIVE or STRICT; portLevelMtls needs a
selector (Istio: "portLevelMtls requires selector"); an action is ALLOW, DENY, AUDIT or
CUSTOM, and CUSTOM names a provider while no other action does; a rule's `when` names a
key and values or notValues.
"""
from __future__ import annotations

from typing import Any

from meshlens.policy.spec import (UNSUPPORTED, SpecError, Where, enum, list_of, map_of, message, run, string,
                                   uint)

__all__ = ["check_authorization_policy", "check_peer_authentication"]

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
_NOT_YET = "is stored, and not enforced until the sidecars do mTLS and authorization"


def check_peer_authentication(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_PEER_AUTHENTICATION, spec)
    if spec.get("portLevelMtls") and not spec.get("selector"):
        raise SpecError(("portLevelMtls",), "needs a selector (Istio: portLevelMtls requires selector)")
    for port in spec.get("portLevelMtls") or {}:
        if not str(port).isdigit() or not 0 < int(port) < 65536:
            raise SpecError(("portLevelMtls", port), "keys are port numbers (1-65535)")
    return [*warnings, ((), _NOT_YET)]


def check_authorization_policy(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_AUTHORIZATION_POLICY, spec)
    action = spec.get("action", "ALLOW")
    if (action == "CUSTOM") != ("provider" in spec):
        raise SpecError(("provider",) if "provider" in spec else ("action",),
                        "CUSTOM needs a provider, and only CUSTOM takes one")
    for i, rule in enumerate(spec.get("rules") or []):
        for j, cond in enumerate(rule.get("when") or []):
            if "key" not in cond or not ("values" in cond or "notValues" in cond):
                raise SpecError(("rules", i, "when", j), "needs a key, and values or notValues")
    return [*warnings, ((), _NOT_YET)]

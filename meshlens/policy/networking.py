"""Istio's networking API, checked as Istio reads it: VirtualService and DestinationRule specs.

Each message is a table of its fields (names as Istio's protos spell them in YAML) and
what each holds. A field no table knows is refused by name and line; a field Istio has
and meshlens does not enforce yet is accepted with a warning naming it, never silently.
Where Istio reads a document differently from its evident intent, a warning says so and
meshlens does what was meant:

- `outlierDetection.consecutiveErrors` is deprecated and Istio ignores it today; it used
  to count 502/503/504 only, so it is read as `consecutiveGatewayErrors` (Istio's
  networking/v1alpha3/destination_rule.proto, OutlierDetection).
- Istio reads a short host name in the namespace of the document that names it
  ("payment-service" in a VirtualService in `production` is
  payment-service.production.svc.cluster.local; in a DestinationRule in `default`, the
  other one: istio.io/latest/docs/reference/config/networking/virtual-service, `hosts`).
  meshlens' mesh has one flat namespace of services: both mean the service, and a
  warning says that Istio would see two hosts.

Semantics checked here, citing Istio: a StringMatch holds exactly one of exact, prefix,
regex (RE2, full match, as Envoy's safe_regex); several route destinations must carry
weights adding up to 100 (istio/pkg/config/validation: "total destination weight");
a weight is 0..100; a subset a route names must be defined by a DestinationRule for its
host (checked across documents: `check_references`).
"""
from __future__ import annotations

from typing import Any

from meshlens.policy.spec import (UNSUPPORTED, SpecError, Where, boolean, duration, enum, list_of, map_of, message,
                                   percent, run, status, string, string_match, uint)

__all__ = ["check_destination_rule", "check_references", "check_virtual_service", "service_of"]


# -- the messages (Istio's networking v1 protos) ------------------------------------------------------

_PORT = message({"number": uint})
_DESTINATION = message({"host": string, "subset": string, "port": _PORT})
_MATCH = message({
    "name": string, "uri": string_match, "scheme": string_match, "method": string_match,
    "authority": string_match, "headers": map_of(lambda v, p: _header_match(v, p)), "queryParams": map_of(
        lambda v, p: string_match(v, p)), "port": uint, "ignoreUriCase": boolean,
    "sourceLabels": map_of(string), "gateways": UNSUPPORTED, "withoutHeaders": UNSUPPORTED,
    "sourceNamespace": UNSUPPORTED, "statPrefix": UNSUPPORTED,
})


def _header_match(v: Any, path: Where) -> None:
    """A header condition: a StringMatch, or {} for presence (Istio: an empty match means present)."""
    if v == {}:
        return
    string_match(v, path)


_ROUTE_DESTINATION = message({"destination": _DESTINATION, "weight": uint, "headers": UNSUPPORTED})
# Envoy's x-envoy-retry-on words and gRPC's x-envoy-retry-grpc-on, as Istio passes retryOn through.
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
                      "retriable-status-codes", "retriable-headers", "envoy-ratelimited", "http3-post-connect-failure",
                      "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})


def _retry_on(v: Any, path: Where) -> None:
    """Comma-separated words Envoy knows, or status codes (Istio reads a number as one to retry)."""
    string(v, path)
    for word in (w.strip() for w in v.split(",")):
        if word and word not in RETRY_ON and not (word.isdigit() and 100 <= int(word) <= 599):
            raise SpecError(path, f"{word!r} is not a retry condition (known: {', '.join(sorted(RETRY_ON))}, "
                                  f"or a status code)")


def _fault_part(fields: dict[str, Any]) -> Any:
    check = message(fields)

    def part(v: Any, path: Where) -> None:
        check(v, path)
        if isinstance(v, dict) and "percentage" not in v and "percent" not in v:
            from meshlens.policy.spec import _WARNINGS

            _WARNINGS.append((path, "has no percentage: Istio injects it into no request (give percentage.value: 100 "
                                    "for every one)"))
    return part


_RETRY = message({"attempts": uint, "perTryTimeout": duration, "retryOn": _retry_on,
                   "retryRemoteLocalities": UNSUPPORTED, "retryIgnorePreviousHosts": UNSUPPORTED,
                   "backoff": duration})
_FAULT = message({
    "delay": _fault_part({"fixedDelay": duration, "percentage": percent, "percent": uint,
                          "exponentialDelay": UNSUPPORTED}),
    "abort": _fault_part({"httpStatus": status, "percentage": percent, "grpcStatus": UNSUPPORTED,
                          "http2Error": UNSUPPORTED}),
})
_HTTP_ROUTE = message({
    "name": string, "match": list_of(_MATCH), "route": list_of(_ROUTE_DESTINATION), "timeout": duration,
    "retries": _RETRY, "fault": _FAULT, "mirror": _DESTINATION, "mirrorPercentage": percent,
    "redirect": UNSUPPORTED, "directResponse": UNSUPPORTED, "delegate": UNSUPPORTED, "rewrite": UNSUPPORTED,
    "corsPolicy": UNSUPPORTED, "headers": UNSUPPORTED, "mirrors": UNSUPPORTED, "mirror_percent": UNSUPPORTED,
    "mirrorPercent": UNSUPPORTED,
})
_VIRTUAL_SERVICE = message({
    "hosts": list_of(string), "http": list_of(_HTTP_ROUTE), "gateways": UNSUPPORTED, "tls": UNSUPPORTED,
    "tcp": UNSUPPORTED, "exportTo": UNSUPPORTED,
})

def _checked_not_enforced(check: Any, why: str) -> Any:
    """Checked field by field as Istio would, and stored with a warning: meshlens does not enforce it yet."""
    def part(v: Any, path: Where) -> None:
        check(v, path)
        from meshlens.policy.spec import _WARNINGS

        _WARNINGS.append((path, f"is not enforced by meshlens yet ({why}): stored as written"))
    return part


_LB = message({"simple": enum("UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN"),
                "consistentHash": UNSUPPORTED, "localityLbSetting": UNSUPPORTED, "warmupDurationSecs": UNSUPPORTED,
                "warmup": UNSUPPORTED})


def _max_ejection(v: Any, path: Where) -> None:
    uint(v, path)
    if v > 100:
        raise SpecError(path, f"is a percentage (0-100), not {v}")


_OUTLIER = message({
    "consecutive5xxErrors": uint, "consecutiveGatewayErrors": uint, "consecutiveErrors": uint,
    "consecutiveLocalOriginFailures": UNSUPPORTED, "splitExternalLocalOriginErrors": UNSUPPORTED,
    "interval": duration, "baseEjectionTime": duration, "maxEjectionPercent": _max_ejection,
    "minHealthPercent": _max_ejection,
})
_POOL = message({
    "tcp": message({"maxConnections": uint, "connectTimeout": duration, "idleTimeout": duration,
                     "tcpKeepalive": UNSUPPORTED, "maxConnectionDuration": UNSUPPORTED}),
    "http": message({"http1MaxPendingRequests": uint, "http2MaxRequests": uint, "maxRequestsPerConnection": uint,
                      "maxRetries": uint, "idleTimeout": duration, "h2UpgradePolicy": UNSUPPORTED,
                      "useClientProtocol": UNSUPPORTED, "maxConcurrentStreams": UNSUPPORTED}),
})
_TRAFFIC_POLICY = message({
    "loadBalancer": _checked_not_enforced(_LB, "the mesh definition's load_balancer applies"),
    "connectionPool": _POOL, "outlierDetection": _OUTLIER, "tls": UNSUPPORTED,
    "portLevelSettings": UNSUPPORTED, "tunnel": UNSUPPORTED, "proxyProtocol": UNSUPPORTED,
})
_SUBSET = message({"name": string, "labels": map_of(string), "trafficPolicy": _checked_not_enforced(
    _TRAFFIC_POLICY, "the DestinationRule's own trafficPolicy applies to every subset")})
_DESTINATION_RULE = message({
    "host": string, "trafficPolicy": _TRAFFIC_POLICY, "subsets": list_of(_SUBSET), "exportTo": UNSUPPORTED,
    "workloadSelector": UNSUPPORTED,
})


# -- the kinds ----------------------------------------------------------------------------------------

def check_virtual_service(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    """Refuse (SpecError) or return warnings, each with the path it is about."""
    warnings = run(_VIRTUAL_SERVICE, spec)
    hosts = spec.get("hosts")
    if not hosts:
        raise SpecError(("hosts",), "at least one host is required")
    for i, rule in enumerate(spec.get("http") or []):
        routes = rule.get("route") or []
        if not routes and not any(k in rule for k in ("redirect", "directResponse", "delegate")):
            raise SpecError(("http", i), "needs a route (or redirect, directResponse, delegate)")
        for j, dest in enumerate(routes):
            if "destination" not in dest or "host" not in dest["destination"]:
                raise SpecError(("http", i, "route", j), "destination.host is required")
            if dest.get("weight", 0) > 100:
                raise SpecError(("http", i, "route", j, "weight"), f"must be 0 to 100, not {dest['weight']}")
        if len(routes) > 1:
            total = sum(d.get("weight", 0) for d in routes)
            if total != 100:
                raise SpecError(("http", i, "route"), f"weights add up to {total}, not 100 (Istio: \"total "
                                                      f"destination weight {total} != 100\")")
    return warnings


def check_destination_rule(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_DESTINATION_RULE, spec)
    if not spec.get("host"):
        raise SpecError(("host",), "is required")
    names: set[str] = set()
    for i, subset in enumerate(spec.get("subsets") or []):
        name = subset.get("name")
        if not name:
            raise SpecError(("subsets", i, "name"), "is required")
        if name in names:
            raise SpecError(("subsets", i, "name"), f"subset {name!r} is defined twice")
        names.add(name)
    for path, policy in _policies(spec):
        outlier = policy.get("outlierDetection") or {}
        if "consecutiveErrors" in outlier:
            if "consecutiveGatewayErrors" in outlier:
                raise SpecError(path + ("outlierDetection", "consecutiveErrors"),
                                "is deprecated and consecutiveGatewayErrors is given too: keep only that one")
            warnings.append((path + ("outlierDetection", "consecutiveErrors"),
                             "is deprecated and Istio ignores it today; it used to count 502, 503 and 504 only, so "
                             "meshlens reads it as consecutiveGatewayErrors"))
    return warnings


def _policies(spec: dict[str, Any]) -> list[tuple[Where, dict[str, Any]]]:
    out = [(("trafficPolicy",), spec["trafficPolicy"])] if isinstance(spec.get("trafficPolicy"), dict) else []
    for i, subset in enumerate(spec.get("subsets") or []):
        if isinstance(subset.get("trafficPolicy"), dict):
            out.append((("subsets", i, "trafficPolicy"), subset["trafficPolicy"]))
    return out


def service_of(host: str, namespace: str) -> tuple[str, str]:
    """(service, namespace) a host names under Istio's rules: a short name is in `namespace`;
    name.ns, name.ns.svc and name.ns.svc.cluster.local name their own."""
    parts = host.split(".")
    if len(parts) == 1:
        return host, namespace
    if len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"):
        return parts[0], parts[1]
    return host, ""  # an external name (example.com): itself


def check_references(resources: list[Any]) -> dict[tuple[str, str], list[tuple[Where, str]]]:
    """Across documents: every subset a VirtualService routes to is defined by a DestinationRule for its host.
    Returns warnings by resource key (Istio's namespace rules against meshlens' flat services)."""
    rules: dict[str, list[Any]] = {}
    for r in resources:
        if r.kind == "DestinationRule":
            ns = r.name.split("/", 1)[0]
            service, _ = service_of(r.doc["spec"]["host"], ns)
            rules.setdefault(service, []).append(r)
    warnings: dict[tuple[str, str], list[tuple[Where, str]]] = {}
    told: set[tuple[Any, Any]] = set()
    for r in resources:
        if r.kind != "VirtualService":
            continue
        ns = r.name.split("/", 1)[0]
        for i, rule in enumerate(r.doc["spec"].get("http") or []):
            for j, dest in enumerate(rule.get("route") or []):
                d = dest["destination"]
                service, host_ns = service_of(d["host"], ns)
                subset = d.get("subset")
                if subset is None:
                    continue
                path = ("http", i, "route", j, "destination", "subset")
                defining = [dr for dr in rules.get(service, ())
                            if subset in {s.get("name") for s in dr.doc["spec"].get("subsets") or []}]
                if not defining:
                    e = SpecError(path, f"subset {subset!r} of {d['host']} is defined by no DestinationRule")
                    e.resource = r
                    raise e
                for dr in defining:
                    dr_ns = dr.name.split("/", 1)[0]
                    _, dr_host_ns = service_of(dr.doc["spec"]["host"], dr_ns)
                    if dr_host_ns != host_ns and (r.key, dr.key) not in told:
                        told.add((r.key, dr.key))  # once a pair, at its first route
                        warnings.setdefault(r.key, []).append((path, (
                            f"Istio would read {d['host']!r} here as {service}.{host_ns}.svc.cluster.local and "
                            f"DestinationRule {dr.name} as {service}.{dr_host_ns}.svc.cluster.local, two hosts; "
                            f"meshlens' mesh has one service {service!r}, and both mean it")))
    return warnings

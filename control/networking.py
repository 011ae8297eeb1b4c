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

import re
from typing import Any, Callable

__all__ = ["check_destination_rule", "check_references", "check_virtual_service", "duration_s", "service_of"]

Where = tuple  # a path into the spec: keys and list indices
Lines = dict  # path -> 1-based line, from the YAML nodes


class SpecError(ValueError):
    """A spec Istio would refuse (or that meshlens cannot read as meant); names the field."""

    def __init__(self, path: Where, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.resource: Any = None
        """The resource it is about, when the check spans several (check_references)."""


# Go's time.ParseDuration units, as Istio's YAML takes them ("30s", "1m30s", "100ms").
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(h|m|s|ms|us|µs|ns))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float:
    """Seconds of a duration as Istio writes them; ValueError otherwise."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 1m30s, 100ms)")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


# -- value kinds -------------------------------------------------------------------------------------

def _str(v: Any, path: Where) -> None:
    if not isinstance(v, str):
        raise SpecError(path, f"must be a string, not {_type(v)}")


def _bool(v: Any, path: Where) -> None:
    if not isinstance(v, bool):
        raise SpecError(path, f"must be true or false, not {_type(v)}")


def _uint(v: Any, path: Where) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SpecError(path, f"must be a whole number of 0 or more, not {v!r}")


def _duration(v: Any, path: Where) -> None:
    try:
        if duration_s(v) <= 0:
            raise ValueError(f"{v!r} must be more than 0")
    except ValueError as e:
        raise SpecError(path, str(e)) from None


def _percent(v: Any, path: Where) -> None:
    _message(_PERCENT)(v, path)
    value = v.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100):
        raise SpecError(path + ("value",), f"must be a number from 0 to 100, not {value!r}")


def _status(v: Any, path: Where) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 200 <= v <= 599:
        raise SpecError(path, f"must be an HTTP status code (200-599), not {v!r}")


def _list(item: Callable[[Any, Where], None]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, list):
            raise SpecError(path, f"must be a list, not {_type(v)}")
        for i, x in enumerate(v):
            item(x, path + (i,))
    return check


def _map(value: Callable[[Any, Where], None]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, dict):
            raise SpecError(path, f"must be a mapping, not {_type(v)}")
        for k, x in v.items():
            if not isinstance(k, str):
                raise SpecError(path, f"keys must be strings, not {k!r}")
            value(x, path + (k,))
    return check


def _string_match(v: Any, path: Where) -> None:
    _message(_STRING_MATCH)(v, path)
    given = [k for k in ("exact", "prefix", "regex") if k in v]
    if len(given) != 1:
        raise SpecError(path, f"must hold exactly one of exact, prefix, regex (has {', '.join(given) or 'none'})")
    if "regex" in v:
        _regex(v["regex"], path + ("regex",))


def _regex(v: Any, path: Where) -> None:
    _str(v, path)
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(v, options)
    except re2.error as e:
        text = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise SpecError(path, f"{v!r} is not an RE2 regular expression: {text}") from None


def _message(fields: dict[str, Any]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, dict):
            raise SpecError(path, f"must be a mapping, not {_type(v)}")
        for k, x in v.items():
            spec = fields.get(k)
            if spec is None:
                known = ", ".join(fields)
                raise SpecError(path + (k,), f"unknown field (known here: {known})")
            if spec is _UNSUPPORTED:
                _WARNINGS.append((path + (k,), "is not enforced by meshlens yet: stored as written"))
            elif callable(spec):
                spec(x, path + (k,))
    return check


def _type(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), type(v).__name__)


_UNSUPPORTED = object()  # an Istio field meshlens stores and does not enforce yet: a warning


def _checked_by_caller(v: Any, path: Where) -> None:
    """A field its message's own check looks at (after the fields are known)."""
_WARNINGS: list[tuple[Where, str]] = []  # filled while one spec is checked (checks are synchronous)

# -- the messages (Istio's networking v1 protos) ------------------------------------------------------

_PERCENT = {"value": _checked_by_caller}
_STRING_MATCH = {"exact": _str, "prefix": _str, "regex": _checked_by_caller}
_PORT = _message({"number": _uint})
_DESTINATION = _message({"host": _str, "subset": _str, "port": _PORT})
_MATCH = _message({
    "name": _str, "uri": _string_match, "scheme": _string_match, "method": _string_match,
    "authority": _string_match, "headers": _map(lambda v, p: _header_match(v, p)), "queryParams": _map(
        lambda v, p: _string_match(v, p)), "port": _uint, "ignoreUriCase": _bool,
    "sourceLabels": _UNSUPPORTED, "gateways": _UNSUPPORTED, "withoutHeaders": _UNSUPPORTED,
    "sourceNamespace": _UNSUPPORTED, "statPrefix": _UNSUPPORTED,
})


def _header_match(v: Any, path: Where) -> None:
    """A header condition: a StringMatch, or {} for presence (Istio: an empty match means present)."""
    if v == {}:
        return
    _string_match(v, path)


_ROUTE_DESTINATION = _message({"destination": _DESTINATION, "weight": _uint, "headers": _UNSUPPORTED})
_RETRY = _message({"attempts": _uint, "perTryTimeout": _duration, "retryOn": _str,
                   "retryRemoteLocalities": _UNSUPPORTED, "retryIgnorePreviousHosts": _UNSUPPORTED,
                   "backoff": _duration})
_FAULT = _message({
    "delay": _message({"fixedDelay": _duration, "percentage": _percent, "percent": _uint,
                       "exponentialDelay": _UNSUPPORTED}),
    "abort": _message({"httpStatus": _status, "percentage": _percent, "grpcStatus": _UNSUPPORTED,
                       "http2Error": _UNSUPPORTED}),
})
_HTTP_ROUTE = _message({
    "name": _str, "match": _list(_MATCH), "route": _list(_ROUTE_DESTINATION), "timeout": _duration,
    "retries": _RETRY, "fault": _FAULT, "mirror": _DESTINATION, "mirrorPercentage": _percent,
    "redirect": _UNSUPPORTED, "directResponse": _UNSUPPORTED, "delegate": _UNSUPPORTED, "rewrite": _UNSUPPORTED,
    "corsPolicy": _UNSUPPORTED, "headers": _UNSUPPORTED, "mirrors": _UNSUPPORTED, "mirror_percent": _UNSUPPORTED,
    "mirrorPercent": _UNSUPPORTED,
})
_VIRTUAL_SERVICE = _message({
    "hosts": _list(_str), "http": _list(_HTTP_ROUTE), "gateways": _UNSUPPORTED, "tls": _UNSUPPORTED,
    "tcp": _UNSUPPORTED, "exportTo": _UNSUPPORTED,
})

_LB_SIMPLE = ("UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN")


def _lb(v: Any, path: Where) -> None:
    _message({"simple": _str, "consistentHash": _UNSUPPORTED, "localityLbSetting": _UNSUPPORTED,
              "warmupDurationSecs": _UNSUPPORTED, "warmup": _UNSUPPORTED})(v, path)
    if "simple" in v and v["simple"] not in _LB_SIMPLE:
        raise SpecError(path + ("simple",), f"must be one of {', '.join(_LB_SIMPLE)}, not {v['simple']!r}")


def _max_ejection(v: Any, path: Where) -> None:
    _uint(v, path)
    if v > 100:
        raise SpecError(path, f"is a percentage (0-100), not {v}")


_OUTLIER = _message({
    "consecutive5xxErrors": _uint, "consecutiveGatewayErrors": _uint, "consecutiveErrors": _uint,
    "consecutiveLocalOriginFailures": _UNSUPPORTED, "splitExternalLocalOriginErrors": _UNSUPPORTED,
    "interval": _duration, "baseEjectionTime": _duration, "maxEjectionPercent": _max_ejection,
    "minHealthPercent": _max_ejection,
})
_POOL = _message({
    "tcp": _message({"maxConnections": _uint, "connectTimeout": _duration, "idleTimeout": _duration,
                     "tcpKeepalive": _UNSUPPORTED, "maxConnectionDuration": _UNSUPPORTED}),
    "http": _message({"http1MaxPendingRequests": _uint, "http2MaxRequests": _uint, "maxRequestsPerConnection": _uint,
                      "maxRetries": _uint, "idleTimeout": _duration, "h2UpgradePolicy": _UNSUPPORTED,
                      "useClientProtocol": _UNSUPPORTED, "maxConcurrentStreams": _UNSUPPORTED}),
})
_TRAFFIC_POLICY = _message({
    "loadBalancer": _lb, "connectionPool": _POOL, "outlierDetection": _OUTLIER, "tls": _UNSUPPORTED,
    "portLevelSettings": _UNSUPPORTED, "tunnel": _UNSUPPORTED, "proxyProtocol": _UNSUPPORTED,
})
_SUBSET = _message({"name": _str, "labels": _map(_str), "trafficPolicy": _TRAFFIC_POLICY})
_DESTINATION_RULE = _message({
    "host": _str, "trafficPolicy": _TRAFFIC_POLICY, "subsets": _list(_SUBSET), "exportTo": _UNSUPPORTED,
    "workloadSelector": _UNSUPPORTED,
})


# -- the kinds ----------------------------------------------------------------------------------------

def check_virtual_service(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    """Refuse (SpecError) or return warnings, each with the path it is about."""
    warnings = _run(_VIRTUAL_SERVICE, spec)
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
    warnings = _run(_DESTINATION_RULE, spec)
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


def _run(check: Callable[[Any, Where], None], spec: Any) -> list[tuple[Where, str]]:
    _WARNINGS.clear()
    try:
        check(spec, ())
        return list(_WARNINGS)
    finally:
        _WARNINGS.clear()


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

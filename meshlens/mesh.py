"""The mesh definition: services, their instances, the subsets labels define, protocol and mode.

Read from `mesh.yaml` (later served by the control plane, same model). The tap
turns addresses into service names with it, the proxy routes outbound calls by
service name, analysis tells meshed from unmeshed callers. Addresses that match
nothing are recorded as `ip:port`, never dropped.

    services:
      catalog:
        protocol: http            # optional: http, http2, grpc, tcp or tls; left out, it is detected
        mode: observe             # observe: dry-run and enforce are set through the control plane
        namespace: shop           # optional (default: default): the namespace of its identity
        service_account: catalog  # optional (default: the service's name)
        load_balancer: LEAST_REQUEST  # optional: ROUND_ROBIN (default) or LEAST_REQUEST
        instances:
          - address: 10.0.0.5:8080
            labels: {version: v1}
          - address: "[fd00::7]:8080"
            labels: {version: v2}
        subsets:
          v1: {version: v1}
          v2: {version: v2}

`protocol` works as Istio's explicit protocol selection: a declared protocol replaces
detection from the first bytes for connections to the service's instances, in the tap
and in sidecars (inbound to the service's own sidecar; outbound where the original
destination is known, i.e. transparent mode). `http`: parsed as HTTP/1.1 (anything else
is a protocol error); `tcp`: passed through as bytes, never parsed; `tls`: passed through
with the ClientHello's attributes recorded. `http2` and `grpc` say what the service's
instances speak, not what a client sends first: connections are still detected (an
HTTP/2 client's preface, or HTTP/1.1), and a sidecar sends every request to the service as
HTTP/2, one stream each, whatever its client spoke (HTTP/1.1 is carried over,
proxy/h2_upstream.py), as Istio does for a port named grpc or http2.

`load_balancer` is how a caller's sidecar picks the instance of this service a request goes
to, named as Istio's DestinationRule `trafficPolicy.loadBalancer.simple`: `ROUND_ROBIN`
(each in turn, the default) or `LEAST_REQUEST` (Envoy's: of two instances drawn at random,
the one with fewer requests in flight). See proxy/cluster.py.

`mode` is refused unless `observe`: dry-run and enforce are set through the control plane
(`meshlens mode set`, where the policies live), and a record's `mode` must never claim one
that nothing applied.

`namespace` and `service_account` name the service's workload identity, as Istio's do:
`spiffe://<trust domain>/ns/<namespace>/sa/<service account>` in the certificates the
control plane's CA issues (control/ca.py).

Unknown fields are refused by name, with the path to them, never ignored.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshlens.yamlfile import read_yaml

Protocol = Literal["http", "http2", "grpc", "tcp", "tls"]
Mode = Literal["observe"]
LoadBalancer = Literal["ROUND_ROBIN", "LEAST_REQUEST"]
PROTOCOLS: tuple[str, ...] = ("http", "http2", "grpc", "tcp", "tls")
"""What `protocol` may declare; without it the protocol is detected (meshlens.protocols.sniff)."""
MODES: tuple[str, ...] = ("observe",)
"""The modes a mesh file may declare, and a sidecar applies, today; `dry-run` and `enforce` come with
enforcement."""
CONTROL_MODES: tuple[str, ...] = ("observe", "dry-run", "enforce")
"""A service's modes as the control plane stores them: observe (traffic untouched, recorded), dry-run
(policies evaluated, what they would do recorded), enforce (policies applied)."""
LOAD_BALANCERS: tuple[str, ...] = ("ROUND_ROBIN", "LEAST_REQUEST")
"""What `load_balancer` may name: Istio's `loadBalancer.simple` values the sidecar implements."""
# Declared protocol -> the protocol a record names (collector/record.py PROTOCOLS), for those that replace
# detection; http2 and grpc do not (see above): RECORDED_PROTOCOL.get gives None, detected.
RECORDED_PROTOCOL: dict[str, str] = {"http": "http/1.1", "tcp": "tcp", "tls": "tls"}
H2_PROTOCOLS = frozenset({"http2", "grpc"})
# Values meshlens will take but cannot honour yet: refused saying so, never accepted and ignored.
_NOT_YET = {
    "mode": {m: f"{m} is set through the control plane (meshlens mode set SERVICE {m}), not in the mesh file"
             for m in ("dry-run", "enforce")},
    "load_balancer": {
        "LEAST_CONN": "LEAST_CONN is Istio's deprecated name for LEAST_REQUEST: use LEAST_REQUEST",
        **{lb: f"{lb} is not available yet (ROUND_ROBIN or LEAST_REQUEST)" for lb in ("RANDOM", "PASSTHROUGH")},
    },
}

_SERVICE_KEYS = {"protocol", "mode", "load_balancer", "instances", "subsets", "namespace", "service_account"}
# Kubernetes' names (RFC 1123 labels), as the SPIFFE ids of Istio carry them.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_INSTANCE_KEYS = {"address", "labels"}


class MeshError(ValueError):
    """The mesh definition cannot be used; the message names the file and the path inside it."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One running copy of a service, at an address."""

    host: str
    """IP address in canonical text form (or a host name, which the tap cannot match)."""
    port: int
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    protocol: Protocol | None = None
    """The declared protocol of connections to this service; None: detected from their first bytes."""
    mode: Mode = "observe"
    """The mode calls to this service are recorded under: observe, as nothing is enforced yet."""
    instances: tuple[Instance, ...] = ()
    subsets: dict[str, dict[str, str]] = field(default_factory=dict, hash=False, compare=False)
    load_balancer: LoadBalancer = "ROUND_ROBIN"
    """How callers' sidecars pick among the instances (proxy/cluster.py)."""
    namespace: str = "default"
    service_account: str = ""
    """Its workload identity's service account; '' means the service's name (`identity_account`)."""

    @property
    def identity_account(self) -> str:
        return self.service_account or self.name

    def subset_of(self, instance: Instance) -> str:
        """The first subset (in file order) whose labels the instance carries, else ''."""
        for name, labels in self.subsets.items():
            if all(instance.labels.get(k) == v for k, v in labels.items()):
                return name
        return ""


@dataclass(frozen=True, slots=True)
class Mesh:
    services: dict[str, Service] = field(default_factory=dict)
    _by_address: dict[tuple[str, int], tuple[Service, Instance]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, services: list[Service], source: str = "mesh") -> "Mesh":
        index: dict[tuple[str, int], tuple[Service, Instance]] = {}
        for svc in services:
            for inst in svc.instances:
                other = index.get((inst.host, inst.port))
                if other is not None and other[0].name != svc.name:
                    raise MeshError(f"{source}: address {inst.address} is listed under both "
                                    f"{other[0].name!r} and {svc.name!r}")
                index[(inst.host, inst.port)] = (svc, inst)
        return cls({s.name: s for s in services}, index)

    def lookup(self, host: str, port: int) -> tuple[Service, Instance] | None:
        """The service and instance at this address, if the mesh names one."""
        return self._by_address.get((_canonical_host(host), port))

    def service_at(self, host: str) -> str | None:
        """The one service with an instance at this IP, on any port (a caller's source port is
        ephemeral); None when none is, or several are (e.g. everything on 127.0.0.1)."""
        h = _canonical_host(host)
        names = {svc.name for (ih, _), (svc, _) in self._by_address.items() if ih == h}
        return names.pop() if len(names) == 1 else None

    def name_of(self, host: str, port: int) -> tuple[str, str]:
        """(service, subset) for an address; unknown addresses are named `ip:port` with no subset."""
        found = self.lookup(host, port)
        if found is None:
            h = _canonical_host(host)
            return (f"[{h}]:{port}" if ":" in h else f"{h}:{port}"), ""
        svc, inst = found
        return svc.name, svc.subset_of(inst)

    def h2_services(self) -> frozenset[str]:
        """The services declared http2 or grpc: a sidecar's requests to them go as HTTP/2."""
        return frozenset(name for name, svc in self.services.items() if svc.protocol in H2_PROTOCOLS)

    def http1_services(self) -> frozenset[str]:
        """The services declared http: a sidecar's requests to them go as HTTP/1.1, an HTTP/2 client's too."""
        return frozenset(name for name, svc in self.services.items() if svc.protocol == "http")

    def declared_protocol(self, host: str, port: int) -> str | None:
        """The protocol declared for the service at this address, if the mesh names one that declares it."""
        found = self._by_address.get((_canonical_host(host), port))
        return found[0].protocol if found is not None else None

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services)) or "none"
            raise MeshError(f"no service {name!r} in the mesh (known: {known})") from None


def load(path: str | Path) -> Mesh:
    """Read and validate a mesh.yaml file."""
    return parse(read_yaml(path, "mesh file", MeshError), str(path))


def parse(doc: Any, source: str = "mesh") -> Mesh:
    """Validate a mesh document already read from YAML or JSON."""
    if doc is None:
        return Mesh.build([], source)
    if not isinstance(doc, dict):
        raise MeshError(f"{source}: expected a mapping with 'services'")
    unknown = sorted(map(_key, set(doc) - {"services"}))
    if unknown:
        raise MeshError(f"{source}: unknown field(s) {', '.join(unknown)} (expected: services)")
    services = doc.get("services") or {}
    if not isinstance(services, dict):
        raise MeshError(f"{source}: services: expected a mapping of service name to its definition")
    return Mesh.build([_service(str(name), body, f"{source}: services.{_key(name)}")
                       for name, body in services.items()], source)


def _service(name: str, body: Any, where: str) -> Service:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise MeshError(f"{where}: service names use letters, digits, '-', '_' and '.'")
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise MeshError(f"{where}: expected a mapping")
    unknown = sorted(map(_key, set(body) - _SERVICE_KEYS))
    if unknown:
        raise MeshError(f"{where}: unknown field(s) {', '.join(unknown)} "
                        f"(expected: {', '.join(sorted(_SERVICE_KEYS))})")
    protocol = None  # detected per connection
    if "protocol" in body:
        protocol = _choice(body["protocol"], PROTOCOLS, f"{where}.protocol", {})
    mode = _choice(body.get("mode", "observe"), MODES, f"{where}.mode", _NOT_YET["mode"])
    load_balancer = _choice(body.get("load_balancer", "ROUND_ROBIN"), LOAD_BALANCERS, f"{where}.load_balancer",
                            _NOT_YET["load_balancer"])
    raw_instances = body.get("instances") or []
    if not isinstance(raw_instances, list):
        raise MeshError(f"{where}.instances: expected a list")
    instances = tuple(_instance(item, f"{where}.instances[{i}]") for i, item in enumerate(raw_instances))
    raw_subsets = body.get("subsets") or {}
    if not isinstance(raw_subsets, dict):
        raise MeshError(f"{where}.subsets: expected a mapping of subset name to labels")
    subsets = {str(k): _labels(v, f"{where}.subsets.{_key(k)}") for k, v in raw_subsets.items()}
    identity = {}
    for key in ("namespace", "service_account"):
        if key in body:
            value = body[key]
            if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
                raise MeshError(f"{where}.{key}: {value!r} must be a DNS label (lowercase letters, digits and '-', "
                                f"at most 63)")
            identity[key] = value
    return Service(name, protocol, mode, instances, subsets, load_balancer, **identity)  # type: ignore[arg-type]


def _instance(item: Any, where: str) -> Instance:
    if isinstance(item, str):
        item = {"address": item}
    if not isinstance(item, dict):
        raise MeshError(f"{where}: expected an address string or a mapping with address and labels")
    unknown = sorted(map(_key, set(item) - _INSTANCE_KEYS))
    if unknown:
        raise MeshError(f"{where}: unknown field(s) {', '.join(unknown)} (expected: address, labels)")
    host, port = parse_address(item.get("address"), f"{where}.address")
    return Instance(host, port, _labels(item.get("labels") or {}, f"{where}.labels"))


def parse_address(value: Any, where: str = "address") -> tuple[str, int]:
    """'10.0.0.5:8080', '[fd00::7]:8080' or 'host:8080' to (canonical host, port)."""
    if not isinstance(value, str) or not value:
        raise MeshError(f"{where}: expected 'host:port', got {value!r}")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise MeshError(f"{where}: expected '[ipv6]:port', got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or ":" in host:
            raise MeshError(f"{where}: expected 'host:port' (IPv6 in brackets), got {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MeshError(f"{where}: port must be 1..65535, got {port_text!r}")
    return _canonical_host(host), int(port_text)


def _canonical_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _labels(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise MeshError(f"{where}: expected a mapping of label to value")
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list)) or v is None:
            raise MeshError(f"{where}.{_key(k)}: a label value is a string, got {v!r}")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _key(key: Any) -> str:
    """A key as an error message names it: as written, or quoted and escaped if it would break the line."""
    text = str(key)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def _choice(value: Any, allowed: tuple[str, ...], where: str, later: dict[str, str]) -> str:
    """`value` if allowed; refused naming why when it is a value that is `later` (not available yet)."""
    if isinstance(value, str) and value in later:
        raise MeshError(f"{where}: {later[value]}")
    if value not in allowed:
        expected = allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)
        raise MeshError(f"{where}: expected {expected}, got {value!r}")
    return str(value)

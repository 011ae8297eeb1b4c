"""Where a request or a connection goes: a `Route`, or a `LocalReply` to answer it with.

One entry point per kind of lookup, each taking what it needs as arguments (no sockets):

- `inbound(peer_host, peer_field)`: to the local app, naming the caller.
- `outbound(authority, peer_field, original_dst)`: an HTTP request leaving the app. A Host
  naming a mesh service goes to one of its instances (proxy/cluster.py balances); on a
  transparently redirected connection anything else goes where the app was connecting;
  an explicit proxy request goes to the address its Host names.
- `address(addr)`: one address, named by the mesh (connections passed through, and the
  transparent fallback above); our own outbound listener is a loop (508).

Routes to single addresses are cached (bounded); balanced ones are picked per request.

A mesh service in dry-run or enforce (proxy/policies.py `Destination`) is routed by its
VirtualService: the first rule the request matches, a destination drawn by weight, and
in enforce an endpoint of the subset it names that outlier detection has not ejected
(a retry's, one not tried yet when there is one). In dry-run the endpoint is picked as
in observe, and the route notes the subset it would have taken (`would_route:v2`).
"""
from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from meshlens.mesh import Mesh, Service, parse_address
from meshlens.proxy.cluster import Cluster, Endpoint
from meshlens.proxy.connect import DPE, UH, LocalReply, no_endpoint

if TYPE_CHECKING:
    from meshlens.protocols.http1 import RequestHead
    from meshlens.proxy.policies import Destination, Policies

__all__ = ["LOOPBACK", "ROUTE_CACHE_SIZE", "LocalReply", "Route", "Router"]

# Resolved non-service authorities kept: far more than one app talks to; bounded against odd Host values.
ROUTE_CACHE_SIZE = 4096
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost", "0.0.0.0", "::"})


class Route:
    """Where one request goes, and how the record names it.

    A plain class, not a frozen dataclass: one is built per balanced request, and a frozen
    dataclass's __init__ costs three times as much (bench/hot_path.py). Never changed once built."""

    __slots__ = ("addr", "dst_service", "dst_subset", "src_service", "endpoint", "dest", "rule", "note")

    def __init__(self, addr: tuple[str, int], dst_service: str, dst_subset: str, src_service: str = "",
                 endpoint: Endpoint | None = None, dest: Destination | None = None, rule: Any = None,
                 note: str = "") -> None:
        self.addr = addr
        self.dst_service = dst_service
        self.dst_subset = dst_subset
        self.src_service = src_service
        """Inbound only: the calling service, when the mesh or the caller's sidecar says (else '')."""
        self.endpoint = endpoint
        """The cluster endpoint it was balanced to, whose active requests it counts until `Router.finished`."""
        self.dest = dest
        """The destination's policies, in dry-run or enforce; None in observe (proxy/policies.py)."""
        self.rule = rule
        """The VirtualService rule the request matched (proxy/routing.py HttpRule), if any."""
        self.note = note
        """What routing did for the record's action: routed:SUBSET, would_route:SUBSET, would_no_route."""

    def __eq__(self, other: object) -> bool:
        """Same address and names (where it goes and how it is recorded); the endpoint and policies aside."""
        if not isinstance(other, Route):
            return NotImplemented
        return (self.addr, self.dst_service, self.dst_subset, self.src_service) == (
            other.addr, other.dst_service, other.dst_subset, other.src_service)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Route({self.addr!r}, {self.dst_service!r}, {self.dst_subset!r}, {self.src_service!r}"
                f"{', ' + self.note if self.note else ''})")


class Router:
    """Routes for one sidecar (per process): the mesh's clusters and the route caches."""

    def __init__(self, mesh: Mesh, service: Service, app: tuple[str, int] | None = None,
                 local_host: str = "127.0.0.1", rng: random.Random | None = None) -> None:
        self.mesh = mesh
        self.service = service
        self.app = app
        """The local application's address; inbound routes go there."""
        self.local_host = local_host
        self.outbound_port: int | None = None
        """Our own outbound listener's port once it listens: an address there is a loop."""
        self._rng = rng or random.Random()
        self.random = self._rng.random
        """The random source of balancing, weights and policies' draws (seeded in tests)."""
        self.clusters: dict[str, Cluster] = {name: Cluster(svc, self._rng) for name, svc in mesh.services.items()}
        self._own_name = service.name.encode()
        self._inbound_subset = mesh.name_of(*app)[1] if app is not None else ""
        self._by_authority: dict[bytes, Route] = {}
        self._by_addr: dict[tuple[str, int], Route] = {}
        self._inbound: dict[str, Route] = {}  # by calling service; at most one per mesh service
        self._src_by_host: dict[str, str | None] = {}  # caller address -> the mesh service there
        self.policies: Policies | None = None
        """What this sidecar applies (proxy/policies.py), None when no service is in dry-run or enforce."""

    def set_policies(self, policies: Policies | None) -> None:
        """The policies from now on (with `update`, between two callbacks: no request sees half of them)."""
        self.policies = policies
        self._inbound = {}
        for name, cluster in self.clusters.items():
            cluster.subsets = {}
            dest = policies.outbound.get(name) if policies is not None else None
            outlier = dest.outlier if dest is not None else None
            if outlier is None:  # no outlier detection now: nothing stays ejected
                for ep in cluster.endpoints:
                    ep.ejected, ep.consecutive_5xx, ep.consecutive_gateway = False, 0, 0
            else:  # kept from the last snapshot, or new: it counts what its endpoints say
                outlier.ejected = sum(1 for ep in cluster.endpoints if ep.ejected)

    def update(self, mesh: Mesh, service: Service) -> None:
        """A new mesh, from now on (the control plane's next snapshot). An instance that stays keeps its
        endpoint, so its requests in flight are still counted; the caches start again."""
        old = {(name, ep.addr): ep for name, c in self.clusters.items() for ep in c.endpoints}
        clusters = {name: Cluster(svc, self._rng) for name, svc in mesh.services.items()}
        for name, cluster in clusters.items():
            cluster.endpoints = tuple(_kept(old.get((name, ep.addr)), ep) for ep in cluster.endpoints)
        self.mesh, self.service, self.clusters = mesh, service, clusters
        self._own_name = service.name.encode()
        self._inbound_subset = mesh.name_of(*self.app)[1] if self.app is not None else ""
        self._by_authority, self._by_addr, self._inbound, self._src_by_host = {}, {}, {}, {}

    def __repr__(self) -> str:
        return f"<Router {self.service.name} clusters={len(self.clusters)}>"

    def inbound(self, peer_host: str, peer_field: bytes = b"") -> Route:
        """The route to the local app, naming the caller: by its address when the mesh lists exactly one
        service there (loopback names no one), else by its sidecar's `x-meshlens-peer` field if that names
        a mesh service."""
        if peer_host in self._src_by_host:
            src = self._src_by_host[peer_host]
        else:
            src = self.mesh.service_at(peer_host) if peer_host not in LOOPBACK else None
            if len(self._src_by_host) < ROUTE_CACHE_SIZE:
                self._src_by_host[peer_host] = src
        if src is None and peer_field:
            name = peer_field.decode("latin-1").strip()
            src = name if name in self.mesh.services else None
        src = src or ""
        route = self._inbound.get(src)
        if route is None:
            assert self.app is not None, "no inbound routes without an app port"
            pol = self.policies
            route = Route(self.app, self.service.name, self._inbound_subset, src, None,
                          pol.inbound if pol is not None else None)
            self._inbound[src] = route
        return route

    def outbound(self, authority: bytes, peer_field: bytes = b"", original_dst: tuple[str, int] | None = None,
                 head: RequestHead | None = None) -> Route | LocalReply:
        """The upstream for a request from the app: `authority` is the absolute-form target's or else the
        Host field, `peer_field` the request's `x-meshlens-peer`, `original_dst` where iptables meant the
        connection to go (transparent mode), None on an explicit proxy connection."""
        if peer_field and peer_field.strip() == self._own_name:
            # our own field on an outbound request: it already went through this sidecar once
            return LocalReply(508, "request came back into the outbound listener (proxy traffic redirected?)", "loop")
        if original_dst is not None:
            svc = self.mesh.services.get(_split_authority(authority.decode("latin-1").strip())[0])
            return self.address(original_dst) if svc is None else self.balanced(svc.name, head)
        cached = self._by_authority.get(authority)
        if cached is not None:
            return cached
        text = authority.decode("latin-1").strip()
        if not text:
            return LocalReply(400, "no Host header and no absolute-form target", "protocol_error", DPE)
        name, port_text = _split_authority(text)
        if name in self.mesh.services:
            return self.balanced(name, head)
        try:
            host, port = parse_address(text if port_text else f"{text}:80")
        except ValueError:
            return LocalReply(400, f"cannot route to {text!r}", "protocol_error", DPE)
        route = self.address((host, port))
        if isinstance(route, Route) and len(self._by_authority) < ROUTE_CACHE_SIZE:
            self._by_authority[authority] = route
        return route

    def address(self, addr: tuple[str, int]) -> Route | LocalReply:
        """A route to one address (named by the mesh), or 508 if it is our own outbound listener."""
        cached = self._by_addr.get(addr)
        if cached is not None:
            return cached
        host, port = addr
        if port == self.outbound_port and (host in LOOPBACK or host == self.local_host):
            return LocalReply(508, "request would loop back into the outbound listener", "loop")
        dst, subset = self.mesh.name_of(host, port)
        route = Route((host, port), dst, subset)
        if len(self._by_addr) < ROUTE_CACHE_SIZE:
            self._by_addr[addr] = route
        return route

    def balanced(self, service: str, head: RequestHead | None = None) -> Route | LocalReply:
        """The instance of a mesh service the next exchange goes to, as its cluster balances (503 UH if none);
        with the service in dry-run or enforce, as its VirtualService routes `head`.

        The endpoint counts the exchange as active until `finished(route)`."""
        pol = self.policies
        if pol is not None:
            dest = pol.outbound.get(service)
            if dest is not None:
                return self._routed(dest, head)
        cluster = self.clusters[service]
        ep = cluster.pick()
        if ep is None:
            return no_endpoint(service)
        cluster.started(ep)
        return Route((ep.host, ep.port), service, ep.subset, "", ep)

    def _routed(self, dest: Destination, head: RequestHead | None) -> Route | LocalReply:
        target, subset, rule, note = dest.service, "", None, ""
        routes = dest.routes
        if routes is not None and head is not None:
            rule = routes.first(head)
            if rule is None:
                if dest.enforced:
                    from meshlens.proxy.policies import NO_ROUTE

                    return NO_ROUTE
                note = "would_no_route"
            else:
                target, subset = rule.pick(self.random)
                if subset:
                    if dest.enforced:
                        note = "routed:" + subset
                    else:
                        note, subset = "would_route:" + subset, ""
        if not subset and not dest.enforced:  # dry-run: the endpoint observe would take
            cluster = self.clusters.get(target)
            if cluster is not None:
                ep = cluster.pick()
                if ep is not None:
                    ep.active += 1  # Cluster.started, inline
                    return Route((ep.host, ep.port), target, ep.subset, "", ep, dest, rule, note)
        return self._pick(dest, target, subset, rule, note, ())

    def _pick(self, dest: Destination, target: str, subset: str, rule: Any, note: str,
              avoid: tuple[Endpoint, ...]) -> Route | LocalReply:
        """An endpoint of `target` (of its `subset`, if any; enforced, not ejected; not in `avoid` if others are left)."""
        cluster = self.clusters.get(target)
        if cluster is None:
            return no_endpoint(target)
        pol = self.policies
        assert pol is not None
        if subset:
            eps = cluster.subsets.get(subset)
            if eps is None:
                eps = cluster.subset(subset, pol.subsets.get(target, {}).get(subset, {}))
        else:
            eps = cluster.endpoints
        if dest.enforced:
            target_dest = dest if target == dest.service else pol.outbound.get(target)
            outlier = target_dest.outlier if target_dest is not None else None
            if outlier is not None:
                now = time.monotonic()
                if outlier.ejected or now >= outlier.next_check:
                    eps = outlier.available(eps, now, cluster.endpoints)
        if avoid:
            rest = tuple(e for e in eps if e not in avoid)
            eps = rest or eps
        ep = cluster.choose(eps)
        if ep is None:
            if not cluster.endpoints:
                return no_endpoint(target)
            return LocalReply(503, f"no healthy upstream for {target}{' subset ' + subset if subset else ''}",
                              "no_healthy_upstream", UH)
        ep.active += 1  # Cluster.started, inline
        return Route((ep.host, ep.port), target, subset or ep.subset, "", ep, dest, rule, note)

    def again(self, route: Route, avoid: tuple[Endpoint, ...] = ()) -> Route | LocalReply:
        """The route of another attempt of a balanced exchange: the same destination and rule, an endpoint picked
        again (one not in `avoid` when there is one); a route to one address stays."""
        if route.endpoint is None:
            return route
        self.finished(route)
        dest = route.dest
        if dest is None:
            return self.balanced(route.dst_service)
        subset = route.note[len("routed:"):] if route.note.startswith("routed:") else ""
        return self._pick(dest, route.dst_service, subset, route.rule, route.note, avoid)

    def mirror_endpoint(self, service: str, subset: str) -> Endpoint | None:
        """Where a mirrored copy goes: an endpoint of `service` (of its `subset`), balanced, not counted as active."""
        cluster = self.clusters.get(service)
        if cluster is None:
            return None
        eps = cluster.endpoints
        if subset and self.policies is not None:
            eps = cluster.subset(subset, self.policies.subsets.get(service, {}).get(subset, {}))
        return cluster.choose(eps)

    def cluster(self, service: str) -> Cluster | None:
        return self.clusters.get(service)

    def finished(self, route: Route) -> None:
        """The exchange that took `route` ended: a balanced endpoint has one active request fewer (its
        service may have left the mesh since, with the control plane's next snapshot)."""
        ep = route.endpoint
        if ep is not None:
            cluster = self.clusters.get(route.dst_service)
            if cluster is not None:  # gone: nobody picks its endpoints any more, their counts do not matter
                cluster.finished(ep)

    def source_service(self, inbound: bool, route: Route | None) -> str:
        """Who called, for records and metrics: this service outbound; inbound, whom the route names."""
        if not inbound:
            return self.service.name
        return route.src_service if route is not None else ""


def _kept(old: Endpoint | None, new: Endpoint) -> Endpoint:
    """The endpoint an instance had before an update, with its subset as the new mesh names it."""
    if old is None:
        return new
    old.subset, old.labels = new.subset, new.labels
    return old


def _split_authority(text: str) -> tuple[str, str]:
    """`host:port` -> (host, port text); a bare host or a bracketed IPv6 literal -> (text, '')."""
    if ":" in text and not text.endswith("]"):
        host, _, port = text.rpartition(":")
        return host, port
    return text, ""

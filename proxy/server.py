"""The sidecar process: configuration, routing, recording, listeners and graceful drain.

State here lives as long as the process: the upstream pool, the open downstream
connections, counters and metrics, the recorder. Connections and requests keep
their own state (proxy/downstream.py, proxy/upstream.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshlens.collector.record import AT, DEFAULT_ROW
from meshlens.mesh import RECORDED_PROTOCOL, Mesh, Service, parse_address
from meshlens.proxy.downstream import HEADER_TIMEOUT, IDLE_TIMEOUT, Downstream
from meshlens.proxy.headers import peer_field
from meshlens.proxy.request import Request
from meshlens.proxy.metrics import Metrics
from meshlens.proxy.transparent import original_dst
from meshlens.proxy.upstream import Pool

if TYPE_CHECKING:
    from meshlens.collector.client import CallRecorder

__all__ = ["DRAIN_TIMEOUT", "RECORD_BATCH_ROWS", "ProxyConfig", "Proxy", "Route", "run"]

log = logging.getLogger("meshlens.proxy")

# Time in-flight exchanges get after SIGTERM: below Kubernetes' 30 s terminationGracePeriod,
# so the sidecar exits on its own before it is killed.
DRAIN_TIMEOUT = 25.0
# Calls per batch shipped to the collector. Encoding a batch holds the interpreter lock for its
# whole length (~1.5 us a call), stalling every exchange in flight: 5,000-call batches gave a p99
# of 21-28 ms under wrk, 1,000-call batches 9-10 ms at the same throughput (bench/proxy.py, measured).
RECORD_BATCH_ROWS = 1000
# Listen backlog: Envoy and nginx (on Linux) use the kernel's somaxconn cap; 1024 is its usual value.
BACKLOG = 1024
# Resolved non-service authorities kept: far more than one app talks to; bounded against odd Host values.
ROUTE_CACHE_SIZE = 4096
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost", "0.0.0.0", "::"})


@dataclass(frozen=True)
class ProxyConfig:
    """What one sidecar needs; validated by the CLI before the proxy starts. Port 0 = ephemeral, -1 = off."""

    service: str
    mesh: Mesh
    inbound_port: int = 15006
    outbound_port: int = 15001
    admin_port: int = 15000
    metrics_port: int = 15090
    app_port: int | None = None
    """The local application's port; without it there is no inbound listener."""
    app_host: str = "127.0.0.1"
    inbound_host: str = "0.0.0.0"
    """Inbound must be reachable by other services' sidecars; everything else binds loopback."""
    local_host: str = "127.0.0.1"
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    observer_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes, and how the record names it."""

    addr: tuple[str, int]
    dst_service: str
    dst_subset: str
    src_service: str = ""
    """Inbound only: the calling service, when the mesh or the caller's sidecar says (else '')."""


class Proxy:
    """One sidecar: its listeners, pool, connections, counters, metrics and recorder."""

    def __init__(self, config: ProxyConfig, recorder: CallRecorder | None) -> None:
        # per process
        self.config = config
        self.service = config.mesh.service(config.service)
        self.recorder = recorder
        self.stats: dict[str, int] = {
            "downstream_cx_total": 0, "downstream_cx_active": 0, "downstream_rq_total": 0,
            "downstream_rq_header_timeout": 0, "upstream_cx_total": 0, "upstream_cx_reused": 0,
            "upstream_rq_refused": 0, "upstream_rq_reset": 0, "downstream_rq_local_reply": 0,
        }
        self.pool = Pool(self.stats)
        self.metrics = Metrics()
        self.conns: set[Downstream] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.ports: dict[str, int] = {}
        self.draining = False
        self._rr: dict[str, int] = {}
        self._routes: dict[bytes, Route] = {}
        self._dst_routes: dict[tuple[str, int], Route] = {}
        self._inbound_routes: dict[str, Route] = {}  # by calling service; at most one per mesh service
        self._src_by_host: dict[str, str | None] = {}  # caller address -> the mesh service there
        self._inbound_subset = ""
        if config.app_port is not None:
            _, self._inbound_subset = config.mesh.name_of(config.app_host, config.app_port)
        self._own_name = self.service.name.encode()
        self.peer_field = peer_field(self.service.name)
        """The field outbound requests carry so that the callee's sidecar can name this service."""

    def __repr__(self) -> str:
        return f"<Proxy {self.service.name} conns={len(self.conns)} draining={self.draining}>"

    # -- routing --------------------------------------------------------------------------------

    def route(self, conn: Downstream, authority: bytes, peer: bytes = b"") -> Route | tuple[int, str, str]:
        """The upstream for a request, or (status, reason, error) to answer it locally.

        `authority` is the absolute-form target's or else the Host field; `peer` is the caller's
        `x-meshlens-peer` field (proxy/headers.py). Inbound goes to the local app. Outbound on a
        transparently redirected connection goes to the service the Host names if the mesh has
        it (balanced), else where the app was connecting; explicit outbound needs a Host."""
        if conn.inbound:
            return self._inbound(conn.peer[0], peer)
        if peer and peer.strip() == self._own_name:
            # our own field on an outbound request: it already went through this sidecar once
            return 508, "request came back into the outbound listener (proxy traffic redirected?)", "loop"
        dst = conn.original_dst
        if dst is not None:
            text = authority.decode("latin-1").strip()
            svc = self.config.mesh.services.get(_split_authority(text)[0])
            return self.route_to(dst) if svc is None else self._balanced(svc)
        cached = self._routes.get(authority)
        if cached is not None:
            return cached
        text = authority.decode("latin-1").strip()
        if not text:
            return 400, "no Host header and no absolute-form target", "protocol_error"
        name, port_text = _split_authority(text)
        svc = self.config.mesh.services.get(name)
        if svc is not None:
            return self._balanced(svc)
        try:
            host, port = parse_address(text if port_text else f"{text}:80")
        except ValueError:
            return 400, f"cannot route to {text!r}", "protocol_error"
        route = self.route_to((host, port))
        if isinstance(route, Route) and len(self._routes) < ROUTE_CACHE_SIZE:
            self._routes[authority] = route
        return route

    def route_to(self, addr: tuple[str, int]) -> Route | tuple[int, str, str]:
        """A route to one address (named by the mesh), or 508 if it is our own outbound listener."""
        cached = self._dst_routes.get(addr)
        if cached is not None:
            return cached
        host, port = addr
        if port == self.ports.get("outbound") and (host in _LOOPBACK or host == self.config.local_host):
            return 508, "request would loop back into the outbound listener", "loop"
        dst, subset = self.config.mesh.name_of(host, port)
        route = Route((host, port), dst, subset)
        if len(self._dst_routes) < ROUTE_CACHE_SIZE:
            self._dst_routes[addr] = route
        return route

    def _balanced(self, svc: Service) -> Route | tuple[int, str, str]:
        """The next instance of a mesh service, round robin."""
        if not svc.instances:
            return 503, f"service {svc.name} has no instances", "no_healthy_upstream"
        i = self._rr.get(svc.name, 0)
        self._rr[svc.name] = i + 1
        inst = svc.instances[i % len(svc.instances)]
        return Route((inst.host, inst.port), svc.name, svc.subset_of(inst))

    def _inbound(self, peer_host: str, peer: bytes) -> Route:
        """The route to the local app, naming the caller: by its address when the mesh lists exactly one
        service there (loopback names no one), else by its sidecar's field if that names a mesh service."""
        mesh = self.config.mesh
        if peer_host in self._src_by_host:
            src = self._src_by_host[peer_host]
        else:
            src = mesh.service_at(peer_host) if peer_host not in _LOOPBACK else None
            if len(self._src_by_host) < ROUTE_CACHE_SIZE:
                self._src_by_host[peer_host] = src
        if src is None and peer:
            name = peer.decode("latin-1").strip()
            src = name if name in mesh.services else None
        src = src or ""
        route = self._inbound_routes.get(src)
        if route is None:
            cfg = self.config
            assert cfg.app_port is not None
            route = Route((cfg.app_host, cfg.app_port), self.service.name, self._inbound_subset, src)
            self._inbound_routes[src] = route
        return route

    def declared_protocol(self, conn: Downstream) -> str | None:
        """What the mesh declares a new connection carries ('http/1.1', 'tcp', 'tls'), None to sniff it.

        Inbound: this service's protocol. Outbound: that of the service at the original destination
        (transparent mode); an explicit outbound connection speaks HTTP to us, whatever it asks for."""
        if conn.inbound:
            declared = self.service.protocol
        elif conn.original_dst is not None:
            declared = self.config.mesh.declared_protocol(*conn.original_dst)
        else:
            return None
        return RECORDED_PROTOCOL[declared] if declared is not None else None

    def source_service(self, conn: Downstream, route: Route | None) -> str:
        """Who called, for records and metrics: this service outbound; inbound, whom the route names."""
        if not conn.inbound:
            return self.service.name
        return route.src_service if route is not None else ""

    # -- connections and records -------------------------------------------------------------------

    def opened(self, conn: Downstream) -> None:
        """A new downstream connection; outbound ones learn where iptables meant to send them."""
        if not conn.inbound:
            sock = conn.transport.get_extra_info("socket")
            try:
                conn.original_dst = original_dst(sock) if sock is not None else None
            except OSError as e:  # the connection is already gone, or the kernel refuses: route by Host
                log.debug("no original destination peer=%s error=%s", conn.peer, e)
        self.conns.add(conn)
        self.stats["downstream_cx_total"] += 1
        if self.draining:
            conn.drain()

    def closed(self, conn: Downstream) -> None:
        self.conns.discard(conn)

    def record(self, req: Request, conn: Downstream) -> None:
        stats = self.stats
        stats["downstream_rq_total"] += 1
        if req.error == "refused":
            stats["upstream_rq_refused"] += 1
        elif req.error == "reset":
            stats["upstream_rq_reset"] += 1
        if req.local is not None:
            stats["downstream_rq_local_reply"] += 1
        end = time.monotonic_ns()
        route = req.route
        inbound = conn.inbound
        dst = route.dst_service if route is not None else ""
        src = self.source_service(conn, route)
        self.metrics.observe(("destination" if inbound else "source", src, dst, req.status, req.error),
                             (end - req.t0) / 1e6, req.request_bytes, req.response_bytes)
        if self.recorder is None:
            return
        trace = req.trace
        attributes = {"x_request_id": req.request_id.decode("latin-1")} if req.request_id else {}
        if req.status == 101:
            attributes["upgraded"] = "true"  # the tap's attribute for an exchange that became a tunnel
        # A row (Call.as_row() order) filled by column position, not Call(**kw): a third of the cost
        # on the thread that serves traffic, ~0.3 µs more than the tuple written out in column order
        # (record.RowPositions has the figures). Columns not set keep their defaults (route, tls, ...).
        row = list(DEFAULT_ROW)
        row[AT.time], row[AT.duration_ns] = req.t_wall, end - req.t0
        row[AT.observer] = "server" if inbound else "client"
        row[AT.observer_id] = self.config.observer_id
        if trace:
            row[AT.trace_id], row[AT.span_id], row[AT.parent_span_id] = (
                trace.trace_id, trace.span_id, trace.parent_span_id)
        row[AT.src_service] = src
        if not inbound:
            row[AT.src_instance] = self.config.observer_id
        row[AT.src_addr], row[AT.src_port] = conn.peer[0], conn.peer[1]
        row[AT.dst_service] = dst
        if route is not None:
            row[AT.dst_subset], row[AT.dst_addr], row[AT.dst_port] = route.dst_subset, route.addr[0], route.addr[1]
        row[AT.protocol], row[AT.method], row[AT.authority], row[AT.path] = (
            "http/1.1", req.method, req.authority, req.path)
        row[AT.status], row[AT.request_bytes], row[AT.response_bytes] = (
            req.status, req.request_bytes, req.response_bytes)
        row[AT.error], row[AT.mode], row[AT.attributes] = req.error, self.service.mode, attributes
        self.recorder.record(tuple(row))

    def snapshot(self) -> dict[str, object]:
        """Counters for /stats."""
        out: dict[str, object] = dict(self.stats)
        out["downstream_cx_active"] = len(self.conns)
        out["upstream_cx_idle"] = sum(len(d) for d in self.pool.idle.values())
        out["draining"] = self.draining
        rec = self.recorder
        if rec is not None:
            out["recorder_sent_calls"] = rec.sent_calls
            out["recorder_buffered"] = rec.buffered
            for reason, n in rec.dropped.items():
                out[f"recorder_dropped_{reason}"] = n
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        listeners = [("outbound", cfg.local_host, cfg.outbound_port, False)]
        if cfg.app_port is not None:
            listeners.append(("inbound", cfg.inbound_host, cfg.inbound_port, True))
        for name, host, port, inbound in listeners:
            if port < 0:
                continue
            server = await loop.create_server(lambda inbound=inbound: Downstream(self, inbound), host, port,
                                              backlog=BACKLOG, reuse_address=True)
            self.servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]

    async def drain(self) -> None:
        """Stop accepting, let in-flight exchanges finish (up to drain_timeout), close the rest."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.conns):
            conn.drain()
        deadline = time.monotonic() + self.config.drain_timeout
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.transport.abort()
        self.pool.close()


def _split_authority(text: str) -> tuple[str, str]:
    """`host:port` -> (host, port text); a bare host or a bracketed IPv6 literal -> (text, '')."""
    if ":" in text and not text.endswith("]"):
        host, _, port = text.rpartition(":")
        return host, port
    return text, ""


def ready_line(proxy: Proxy, admin_ports: dict[str, int]) -> str:
    ports = {**proxy.ports, **admin_ports}
    fields = " ".join(f"{k}={proxy.config.local_host if k != 'inbound' else proxy.config.inbound_host}:{v}"
                      for k, v in ports.items())
    return f"meshlens proxy ready service={proxy.service.name} {fields}"


async def serve(config: ProxyConfig, recorder: CallRecorder | None) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    from meshlens.proxy.admin import start_admin

    proxy = Proxy(config, recorder)
    await proxy.start()
    runners, admin_ports = await start_admin(proxy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready_line(proxy, admin_ports), flush=True)
    log.info("proxy started service=%s ports=%s loop=%s", proxy.service.name, {**proxy.ports, **admin_ports},
             type(loop).__module__)
    await stop.wait()
    log.info("draining in_flight_connections=%d", len(proxy.conns))
    await proxy.drain()
    for runner in runners:
        await runner.cleanup()


def run(config: ProxyConfig, recorder: CallRecorder | None) -> None:
    """Serve on uvloop when installed, else asyncio's default loop."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config, recorder))
    if recorder is not None:
        recorder.close()
    sys.stdout.flush()

"""The sidecar process: configuration, listeners, graceful drain, and what lives as long as the process.

Per-process state is built here and held by `Proxy`: the router (proxy/router.py, with
its clusters), the upstream pool, the open downstream connections, counters, metrics,
the recording of each call (proxy/record.py) and the recorder shipping them. Connections
and requests keep their own state (proxy/downstream.py, proxy/upstream.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

from meshlens.mesh import RECORDED_PROTOCOL, Mesh
from meshlens.proxy.connect import UF, LocalReply, failure, open_connection
from meshlens.proxy.downstream import HEADER_TIMEOUT, IDLE_TIMEOUT, Downstream
from meshlens.proxy.exchange import Env, Exchange
from meshlens.proxy.h2_fields import H2RequestHead, Unchunk, h1_request_head, request_fields, request_fields_from_h1
from meshlens.proxy.h2_upstream import H2Pool
from meshlens.proxy.headers import peer_field
from meshlens.proxy.metrics import Metrics
from meshlens.proxy.mirror import Mirrors, shadow_fields, shadow_head
from meshlens.proxy.mtls import meshed, spiffe_of
from meshlens.proxy.policies import Policies
from meshlens.proxy.pool import Pool
from meshlens.proxy.record import Recording
from meshlens.proxy.router import Router
from meshlens.proxy.transparent import original_dst
from meshlens.proxy.upstream import Upstream

if TYPE_CHECKING:
    from meshlens.collector.client import CallRecorder
    from meshlens.proxy.control import ControlWatch, IdentityWatch

__all__ = ["DRAIN_TIMEOUT", "RECORD_BATCH_ROWS", "ProxyConfig", "Proxy", "run"]

log = logging.getLogger("meshlens.proxy")

# Time in-flight exchanges get after SIGTERM: below Kubernetes' 30 s terminationGracePeriod,
# so the sidecar exits on its own before it is killed.
DRAIN_TIMEOUT = 25.0
# Calls per batch shipped to the collector: a second's worth at 1,000 req/s. Encoding no longer
# holds the interpreter lock for a batch (the recorder encodes in slices, ~1 ms at most:
# bench/recorder.py), so this bounds the batch's size on the wire, not the proxy's p99.
RECORD_BATCH_ROWS = 1000
# Listen backlog: Envoy and nginx (on Linux) use the kernel's somaxconn cap; 1024 is its usual value.
BACKLOG = 1024


def observer_id() -> str:
    """This sidecar's instance name in its records and to the control plane: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    upstream_timeout: float | None = None
    """Route timeout: a response must be complete within this many seconds, else 504 UT. Off by default, as in Istio."""
    observer_id: str = field(default_factory=lambda: observer_id())


P = TypeVar("P")


class Proxy:
    """One sidecar: its listeners, router, pool, connections, counters, metrics and recording."""

    def __init__(self, config: ProxyConfig, recorder: CallRecorder | None) -> None:
        # per process
        self.config = config
        self.mesh = config.mesh
        """The mesh in force: the --mesh file's, or the control plane's latest snapshot (`apply_snapshot`)."""
        self.service = config.mesh.service(config.service)
        self.recorder = recorder
        self.stats: dict[str, int] = {
            "downstream_cx_total": 0, "downstream_cx_active": 0, "downstream_rq_total": 0,
            "downstream_rq_header_timeout": 0, "upstream_cx_total": 0, "upstream_cx_reused": 0,
            "upstream_rq_refused": 0, "upstream_rq_reset": 0, "downstream_rq_local_reply": 0,
            "downstream_cx_mtls": 0, "downstream_cx_tls_refused": 0, "downstream_cx_plaintext_refused": 0,
            "downstream_cx_tls_unfinished": 0, "downstream_cx_tls_hello_invalid": 0,
            "downstream_cx_tls_record_error": 0, "upstream_cx_mtls": 0, "upstream_cx_mtls_resumed": 0,
            "upstream_cx_identity_refused": 0, "downstream_cx_plaintext_drained": 0,
            "downstream_cx_http2_total": 0, "downstream_cx_http2_upgrade": 0, "downstream_cx_http2_protocol_error": 0,
            "downstream_cx_http2_premature_resets": 0, "upstream_cx_http2_total": 0, "upstream_rq_http2_reused": 0,
        }
        self.pool = Pool(self.stats)
        self.h2_pool = H2Pool(self.stats, self.open_for)
        self.h2_services = self.mesh.h2_services()
        """Services declared grpc or http2: a request to one goes upstream as HTTP/2, whatever the client spoke."""
        self.http1_services = self.mesh.http1_services()
        """Services declared http: an HTTP/2 client's request to one goes upstream as HTTP/1.1."""
        self.metrics = Metrics()
        self.router = Router(self.mesh, self.service,
                             (config.app_host, config.app_port) if config.app_port is not None else None,
                             config.local_host)
        self.recording = Recording(self.service, config.observer_id, self.router, self.stats, self.metrics, recorder)
        self.conns: set[Downstream] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.ports: dict[str, int] = {}
        self.draining = False
        self.peer_field = peer_field(self.service.name)
        """The field outbound requests carry so that the callee's sidecar can name this service."""
        self.control: ControlWatch | None = None
        """The control plane this sidecar follows, if any."""
        self.identity: IdentityWatch | None = None
        """Its workload certificate from the control plane's CA, if it follows one (proxy/identity.py)."""
        self.desired_mode = "observe"
        """The mode the control plane asks of this service (and, with its policies, applies)."""
        self.mirrors = Mirrors(self.stats)
        self.envs = (Env(self.pool, self.peer_field, config.upstream_timeout, self._dial, self.router.again,
                         self.router.cluster, self._mirror, self.h2_pool),
                     Env(self.pool, b"", config.upstream_timeout, self._dial, self.router.again, self.router.cluster,
                         self._mirror, self.h2_pool))
        """What exchanges run in, by listener: [outbound, inbound]."""
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()

    def __repr__(self) -> str:
        return f"<Proxy {self.service.name} conns={len(self.conns)} draining={self.draining}>"

    @property
    def mode(self) -> str:
        """The mode this service's calls run in: the control plane's for it (observe with a mesh file alone)."""
        return self.desired_mode

    # -- connections ------------------------------------------------------------------------------

    def declared_protocol(self, conn: Downstream) -> str | None:
        """What the mesh declares a new connection carries ('http/1.1', 'tcp', 'tls'), None to sniff it.

        Inbound: this service's protocol. Outbound: that of the service at the original destination
        (transparent mode); an explicit outbound connection speaks HTTP to us, whatever it asks for."""
        if conn.inbound:
            declared = self.service.protocol
        elif conn.original_dst is not None:
            declared = self.mesh.declared_protocol(*conn.original_dst)
        else:
            return None
        return RECORDED_PROTOCOL.get(declared) if declared is not None else None

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

    # -- the control plane's snapshots ---------------------------------------------------------------

    def apply_snapshot(self, snap: dict[str, object]) -> str:
        """A snapshot from the control plane (proxy/control.py), checked and in force from the next
        request, connections and requests in flight untouched; returns the mode this sidecar applies.
        Raises ValueError (nothing changed) when it cannot be applied."""
        from meshlens.mesh import CONTROL_MODES, MeshError, parse
        from meshlens.policy.trust import read_trust

        try:
            mesh = parse(snap.get("mesh"), f"snapshot {snap.get('version')}")
            service = mesh.service(self.config.service)
        except MeshError as e:
            raise ValueError(str(e)) from None
        modes = snap.get("modes")
        if not isinstance(modes, dict) or not all(m in CONTROL_MODES for m in modes.values()):
            raise ValueError(f"snapshot {snap.get('version')}: modes must map services to one of "
                             f"{', '.join(CONTROL_MODES)}")
        policies_docs = snap.get("policies") or []
        if not isinstance(policies_docs, list):
            raise ValueError(f"snapshot {snap.get('version')}: policies must be a list of documents")
        cfg = self.config  # this sidecar's instance, if the mesh lists it by the app's or the inbound address
        found = (mesh.lookup(cfg.app_host, cfg.app_port) if cfg.app_port is not None else None) or (
            mesh.lookup(cfg.local_host, self.ports["inbound"]) if "inbound" in self.ports else None)
        policies = Policies.build(mesh, service.name, modes, policies_docs, self.router.random,
                                  self.router.policies, found[1].labels if found else None)  # ValueError: NACKed
        if snap.get("trust") is not None and self.identity is not None:  # a root rotation's step (proxy/control.py)
            self.identity.trust(read_trust(snap["trust"], f"snapshot {snap.get('version')}"))
        self.mesh, self.service = mesh, service
        self.h2_services, self.http1_services = mesh.h2_services(), mesh.http1_services()
        self.router.update(mesh, service)
        self.router.set_policies(policies if policies.outbound or policies.inbound else None)
        self.desired_mode = str(modes.get(service.name, "observe"))
        if "inbound" in self.ports:
            mtls, mode_of = self.inbound_mtls()
            for conn in list(self.conns):
                if conn.inbound and conn.tls is None:
                    conn.peer_authentication_changed(mtls, mode_of)
        return self.desired_mode

    # -- what exchanges ask of the process ---------------------------------------------------------

    def inbound_mtls(self) -> tuple[str, str | None]:
        """The PeerAuthentication mode for the app's port, and the mode it runs in (None: observe, nothing applies)."""
        pol = self.router.policies
        inbound = pol.inbound if pol is not None else None
        if inbound is None:
            return "PERMISSIVE", None
        app = self.config.app_port
        return inbound.mtls_ports.get(app, inbound.mtls) if app is not None else inbound.mtls, inbound.mode

    def mtls_server(self) -> ssl.SSLContext | None:
        """The context inbound mTLS is terminated with, once this sidecar holds a certificate (proxy/identity.py)."""
        identity = self.identity
        return identity.workload.server if identity is not None else None

    def _dial(self, addr: tuple[str, int], ex: Exchange) -> None:
        if ex.upstream_h2:
            self.h2_pool.dial(addr, ex)
        else:
            self.loop.create_task(self._connect(addr, ex))

    async def _connect(self, addr: tuple[str, int], ex: Exchange) -> None:
        self.stats["upstream_cx_total"] += 1
        up = await self.open_for(lambda: Upstream(self.pool, addr), addr, ex)
        if isinstance(up, LocalReply):
            ex.connect_failed(up)
        else:
            ex.connected(up)

    async def open_for(self, protocol: Callable[[], P], addr: tuple[str, int], ex: Exchange) -> P | LocalReply:
        """A connection to `addr` for `ex` (HTTP/1.1 or HTTP/2), with mTLS when its endpoint is meshed and the server
        proven to be the destination service; or what its failure is answered and recorded as."""
        expected, tls = self._mtls_to(ex)
        try:
            up = await open_connection(protocol, addr, ex.connect_timeout, tls)
        except OSError as e:
            return failure(e)
        if tls is not None:
            transport = up.transport  # type: ignore[attr-defined]
            got = spiffe_of(transport.get_extra_info("peercert") if transport is not None else None)
            if got != expected:  # a server that is not the destination service: as if it could not be reached
                self.stats["upstream_cx_identity_refused"] += 1
                up.abort()  # type: ignore[attr-defined]
                why = f"it is {got}, not {expected}" if got else f"it shows no SPIFFE id, {expected} expected"
                return LocalReply(503, f"upstream connect error: {why}", "tls_identity", UF)
            self.stats["upstream_cx_mtls"] += 1
            if transport is not None and transport.get_extra_info("ssl_object").session_reused:
                self.stats["upstream_cx_mtls_resumed"] += 1
            up.peer_identity = got  # type: ignore[attr-defined]
        return up

    def _mtls_to(self, ex: Exchange) -> tuple[str, ssl.SSLContext | None]:
        """Whether this exchange's connection is mTLS (Istio's auto mTLS: the instance's sidecar accepts it), and the
        server identity it must show: the destination service's."""
        identity, route = self.identity, ex.route
        if identity is None or route is None or route.endpoint is None or not meshed(route.endpoint.labels):
            return "", None
        workload = identity.workload
        svc = self.mesh.services.get(route.dst_service)
        if workload.client is None or svc is None or time.time() >= workload.expires_at:
            return "", None  # without a certificate a peer would accept, plaintext: PERMISSIVE serves it, STRICT not
        return workload.identity_of(svc.namespace, svc.identity_account), workload.client

    def _mirror(self, ex: Exchange) -> bool:
        """A copy of `ex`'s complete request to an endpoint of its mirror (proxy/mirror.py)."""
        assert ex.mirror_to is not None
        service, subset = ex.mirror_to
        ep = self.router.mirror_endpoint(service, subset)
        if ep is None:
            self.stats["mirror_failed"] += 1
            return False
        head, trace = ex.head, ex.trace
        body = b"".join(ex.replay) if ex.replay else b""
        came_h2 = isinstance(head, H2RequestHead)
        if service in self.h2_services or came_h2 and service not in self.http1_services:
            if came_h2:
                fields = request_fields(head, trace, None, b"")
            else:  # its body as it came, framing and all: unframed for DATA
                fields = request_fields_from_h1(head, trace, None, b"")
                if head.chunked:
                    body = Unchunk().feed(body)
            return self.mirrors.send_h2(ep.addr, shadow_fields(fields), body)
        added = b"traceparent: " + trace.header() + b"\r\n"
        raw = h1_request_head(head, trace, None, b"", len(body))[0] if came_h2 else head.raw
        return self.mirrors.send(ep.addr, shadow_head(raw, head.authority, added) + body)

    def _sweep(self) -> None:
        self.pool.sweep()
        self.h2_pool.sweep()
        self.loop.call_later(1.0, self._sweep)

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
            out["recorder_unsent_calls"] = rec.unsent_calls
            for reason, n in rec.dropped.items():
                out[f"recorder_dropped_{reason}"] = n
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        loop.call_later(1.0, self._sweep)
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
        self.router.outbound_port = self.ports.get("outbound")  # an address there is a loop

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
        self.h2_pool.close()


def ready_line(proxy: Proxy, admin_ports: dict[str, int]) -> str:
    ports = {**proxy.ports, **admin_ports}
    fields = " ".join(f"{k}={proxy.config.local_host if k != 'inbound' else proxy.config.inbound_host}:{v}"
                      for k, v in ports.items())
    return f"meshlens proxy ready service={proxy.service.name} {fields}"


async def serve(config: ProxyConfig, recorder: CallRecorder | None, watch: ControlWatch | None = None,
                snap: dict[str, object] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain; with `watch`, starting from `snap` and following the control plane."""
    from meshlens.proxy.admin import start_admin  # here, not at import: bench and tests build a Proxy alone

    proxy = Proxy(config, recorder)
    if watch is not None:
        assert snap is not None
        from meshlens.proxy.control import IdentityWatch
        from meshlens.proxy.identity import Workload

        proxy.identity = IdentityWatch(watch, Workload())
        try:
            error = ""
            proxy.control = watch
            watch.mode = proxy.apply_snapshot(snap)
        except ValueError as e:  # checked by the CLI already; a mode it cannot read is refused here
            error = str(e)
        watch.start(asyncio.get_running_loop(), proxy.apply_snapshot, snap, error)
        proxy.identity.start(asyncio.get_running_loop())
    await proxy.start()
    admin_servers, admin_ports = await start_admin(proxy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(ready_line(proxy, admin_ports), flush=True)
    log.info("proxy started service=%s ports=%s loop=%s", proxy.service.name, {**proxy.ports, **admin_ports},
             type(loop).__module__)
    await stop.wait()
    if watch is not None:
        watch.stop()
    if proxy.identity is not None:
        proxy.identity.stop()
    log.info("draining in_flight_connections=%d", len(proxy.conns))
    await proxy.drain()
    for server in admin_servers:
        server.close()


def run(config: ProxyConfig, recorder: CallRecorder | None, watch: ControlWatch | None = None,
        snap: dict[str, object] | None = None) -> None:
    """Serve on uvloop when installed, else asyncio's default loop."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config, recorder, watch, snap))
    if recorder is not None:
        recorder.close()
    sys.stdout.flush()

"""Downstream connections that are not HTTP/1.x: passed through as a tunnel, recorded as one call.

`Downstream` sniffs each connection's first bytes (`meshlens.protocols.sniff`); TLS, the
HTTP/2 preface and anything else come here. The destination is the local app on the
inbound listener and the connection's original destination (transparent mode) on the
outbound one; an outbound connection without one has nowhere to go and is closed
(`protocol_error`). The call mirrors the tap's (tap/calls.py): protocol `tls`, `h2` or
`tcp`, bytes each way, the connection's lifetime, SNI as authority and the hellos'
versions and ALPN as attributes, read as they pass (nothing is decrypted). A destination
that cannot be reached is recorded as proxy/connect.py names the failure (`UF`).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from meshlens.proxy.connect import NR, LocalReply, failure, open_connection
from meshlens.proxy.exchange import State
from meshlens.proxy.identity import TlsWatch
from meshlens.proxy.tunnel import SERVER, Tunnel

if TYPE_CHECKING:
    from meshlens.proxy.downstream import Downstream
    from meshlens.proxy.exchange import Exchange
    from meshlens.proxy.router import Route

__all__ = ["SNIFF_TIMEOUT", "Passthrough", "connect_method", "destination"]

# A client that has sent nothing this long after connecting is waiting for the server to
# speak first (MySQL, SMTP, SSH): its connection is passed through as tcp. Istio's
# protocolDetectionTimeout was 100 ms (later off by default, as slow clients then lost
# HTTP handling); one second keeps any client that sends at once on the HTTP path.
SNIFF_TIMEOUT = 1.0


def destination(conn: Downstream) -> Route | LocalReply:
    """Where a connection that is not HTTP goes: the local app (inbound), the original destination (outbound)."""
    if not conn.has_destination:  # Envoy's NR: no filter chain matches the connection
        return LocalReply(400, "not HTTP and no original destination", "protocol_error", NR)
    router = conn.proxy.router
    if conn.inbound:
        return router.inbound(conn.peer[0])
    assert conn.original_dst is not None
    return router.address(conn.original_dst)


class Passthrough:
    """One sniffed connection: its destination, its tunnel and its record."""

    __slots__ = ("conn", "protocol", "route", "tunnel", "tls", "error", "flags")

    def __init__(self, conn: Downstream, protocol: str) -> None:
        self.conn = conn
        self.protocol = protocol
        self.route: Route | None = None
        self.tunnel: Tunnel | None = None
        self.tls = TlsWatch() if protocol == "tls" else None
        self.error = ""
        self.flags = ""

    def __repr__(self) -> str:
        return f"<Passthrough {self.protocol} {self.conn.peer} tunnel={self.tunnel!r}>"

    def start(self, first: bytes) -> None:
        """`first`: the client's bytes read so far. Route, adopt the client's transport, connect."""
        conn = self.conn
        route = destination(conn)
        if isinstance(route, LocalReply):
            self.error, self.flags = route.error, route.flags
            self._record(None)
            conn.transport.close()  # Downstream.connection_lost still runs: the proxy forgets it there
            return
        self.route = route
        tls = self.tls
        tunnel = self.tunnel = Tunnel(conn.proxy.config.idle_timeout, self._closed,
                                      (tls.client_bytes, tls.server_bytes) if tls is not None else (None, None))
        conn.tunnel = tunnel
        tunnel.client.adopt(conn.transport, conn.write_paused)
        tunnel.send(SERVER, first)
        conn.proxy.metrics.tcp_opened(self._labels())
        asyncio.get_running_loop().create_task(self._connect(route.addr))

    async def _connect(self, addr: tuple[str, int]) -> None:
        tunnel = self.tunnel
        assert tunnel is not None
        try:
            await open_connection(lambda: tunnel.server, addr)
        except OSError as e:  # refused, timed out (TimeoutError is one), unreachable
            reply = failure(e)
            self.flags = reply.flags
            tunnel.connect_failed(reply.error)
        else:
            tunnel.start()

    def _labels(self) -> tuple[str, str, str]:
        conn, route = self.conn, self.route
        return ("destination" if conn.inbound else "source", conn.proxy.router.source_service(conn.inbound, route),
                route.dst_service if route else "")

    def _closed(self, tunnel: Tunnel) -> None:
        self.error = tunnel.error
        self.conn.proxy.metrics.tcp_closed(self._labels(), self.flags or "-", tunnel.bytes[0], tunnel.bytes[1])
        self._record(tunnel)
        self.conn.proxy.closed(self.conn)

    def _record(self, tunnel: Tunnel | None) -> None:
        self.conn.proxy.recording.connection(self.conn, self.protocol, self.route, tunnel, self.error, self.flags,
                                             self.tls)


async def connect_method(conn: Downstream, ex: Exchange) -> None:
    """CONNECT through the outbound sidecar: connect to the routed target, answer 200, become a tunnel.

    Recorded as the CONNECT exchange (status 200, the tunnel's bytes) when the tunnel ends."""
    route = ex.route
    assert route is not None
    tunnel = Tunnel(conn.proxy.config.idle_timeout, lambda t: conn.tunnel_closed(ex, t))
    try:
        await open_connection(lambda: tunnel.server, route.addr)
    except OSError as e:  # as an HTTP request's upstream would be: 503 UF
        ex.reply(failure(e))
        return
    if ex.state is State.DONE or conn.transport.is_closing():  # the client left while we were connecting
        tunnel.abort("closed", "downstream_closed")
        return
    ex.tunnel_opened()
    conn.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    conn.upgraded(ex, None, b"", tunnel)

"""Downstream connections that are not HTTP/1.x: passed through as a tunnel, recorded as one call.

`Downstream` sniffs each connection's first bytes (`meshlens.protocols.sniff`); TLS, the
HTTP/2 preface and anything else come here. The destination is the local app on the
inbound listener and the connection's original destination (transparent mode) on the
outbound one; an outbound connection without one has nowhere to go and is closed
(`protocol_error`). The call mirrors the tap's (tap/calls.py): protocol `tls`, `h2` or
`tcp`, bytes each way, the connection's lifetime, SNI as authority and the hellos'
versions and ALPN as attributes, read as they pass (nothing is decrypted).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshlens.collector.record import Call
from meshlens.protocols.errors import PeerError
from meshlens.protocols.tls import ClientHello, HelloParser, ServerHello, hello_attributes
from meshlens.proxy.tunnel import SERVER, Tunnel
from meshlens.proxy.upstream import CONNECT_TIMEOUT

if TYPE_CHECKING:
    from meshlens.proxy.downstream import Downstream
    from meshlens.proxy.request import Request
    from meshlens.proxy.server import Route

__all__ = ["SNIFF_TIMEOUT", "Passthrough", "TlsWatch", "connect_method", "destination"]

# A client that has sent nothing this long after connecting is waiting for the server to
# speak first (MySQL, SMTP, SSH): its connection is passed through as tcp. Istio's
# protocolDetectionTimeout was 100 ms (later off by default, as slow clients then lost
# HTTP handling); one second keeps any client that sends at once on the HTTP path.
SNIFF_TIMEOUT = 1.0


class TlsWatch:
    """Both hellos of a TLS connection, read from the bytes as they pass through."""

    __slots__ = ("parsers", "client_hello", "server_hello", "error")

    def __init__(self) -> None:
        self.parsers: list[HelloParser | None] = [HelloParser("client"), HelloParser("server")]
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.error = ""

    def client_bytes(self, data: bytes) -> bool:
        return self._feed(0, data)

    def server_bytes(self, data: bytes) -> bool:
        return self._feed(1, data)

    def _feed(self, i: int, data: bytes) -> bool:
        """True once this direction needs no more bytes."""
        parser = self.parsers[i]
        if parser is None:
            return True
        try:
            hello = parser.feed(data)
        except PeerError as e:  # not ours to judge: the bytes still pass, the record says why it has no SNI
            self.error = self.error or str(e)
            self.parsers[i] = None
            return True
        if hello is None:
            return False
        if isinstance(hello, ClientHello):
            self.client_hello = hello
        else:
            self.server_hello = hello
            if hello.hello_retry:  # RFC 8446 4.1.4: the real ServerHello follows the client's second hello
                self.parsers[i] = HelloParser("server")
                return False
        self.parsers[i] = None
        return True

    def fill(self, call: Call) -> None:
        """Authority and attributes as the tap names them."""
        call.tls = True
        if self.client_hello is not None:
            call.authority = self.client_hello.sni or ""
        call.attributes.update(hello_attributes(self.client_hello, self.server_hello, self.error))


def destination(conn: Downstream) -> Route | tuple[int, str, str]:
    """Where a connection that is not HTTP goes: the local app (inbound), the original destination (outbound)."""
    if not conn.has_destination:
        return 400, "not HTTP and no original destination", "protocol_error"
    if conn.inbound:
        return conn.proxy.route(conn, b"")
    assert conn.original_dst is not None
    return conn.proxy.route_to(conn.original_dst)


class Passthrough:
    """One sniffed connection: its destination, its tunnel and its record."""

    __slots__ = ("conn", "protocol", "route", "tunnel", "tls", "error")

    def __init__(self, conn: Downstream, protocol: str) -> None:
        self.conn = conn
        self.protocol = protocol
        self.route: Route | None = None
        self.tunnel: Tunnel | None = None
        self.tls = TlsWatch() if protocol == "tls" else None
        self.error = ""

    def __repr__(self) -> str:
        return f"<Passthrough {self.protocol} {self.conn.peer} tunnel={self.tunnel!r}>"

    def start(self, first: bytes) -> None:
        """`first`: the client's bytes read so far. Route, adopt the client's transport, connect."""
        conn = self.conn
        route = destination(conn)
        if isinstance(route, tuple):
            self.error = route[2]
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
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: tunnel.server, addr[0], addr[1]), CONNECT_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):
            tunnel.connect_failed("timeout")
        except OSError:
            tunnel.connect_failed("refused")
        else:
            tunnel.start()

    def _labels(self) -> tuple[str, str, str]:
        conn, route = self.conn, self.route
        return ("destination" if conn.inbound else "source", conn.proxy.source_service(conn, route),
                route.dst_service if route else "")

    def _closed(self, tunnel: Tunnel) -> None:
        self.error = tunnel.error
        self.conn.proxy.metrics.tcp_closed(self._labels(), self.error, tunnel.bytes[0], tunnel.bytes[1])
        self._record(tunnel)
        self.conn.proxy.closed(self.conn)

    def _record(self, tunnel: Tunnel | None) -> None:
        conn = self.conn
        proxy = conn.proxy
        recorder = proxy.recorder
        if recorder is None:
            return
        route = self.route
        inbound = conn.inbound
        call = Call(
            time=conn.t_wall, duration_ns=time.monotonic_ns() - conn.t0,
            observer="server" if inbound else "client", observer_id=proxy.config.observer_id,
            src_service=self._labels()[1], src_instance="" if inbound else proxy.config.observer_id,
            src_addr=conn.peer[0], src_port=conn.peer[1],
            dst_service=route.dst_service if route else "", dst_subset=route.dst_subset if route else "",
            dst_addr=route.addr[0] if route else "", dst_port=route.addr[1] if route else 0,
            protocol=self.protocol, error=self.error, mode=proxy.service.mode,
            request_bytes=tunnel.bytes[0] if tunnel else 0, response_bytes=tunnel.bytes[1] if tunnel else 0,
        )
        if tunnel is not None and tunnel.reason:
            call.attributes["close"] = tunnel.reason
        if self.tls is not None:
            self.tls.fill(call)
        recorder.record(call)


async def connect_method(conn: Downstream, req: Request) -> None:
    """CONNECT through the outbound sidecar: connect to the routed target, answer 200, become a tunnel.

    Recorded as the CONNECT exchange (status 200, the tunnel's bytes) when the tunnel ends."""
    route = req.route
    assert route is not None
    tunnel = Tunnel(conn.proxy.config.idle_timeout, lambda t: conn.tunnel_closed(req, t))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: tunnel.server, *route.addr), CONNECT_TIMEOUT)
    except (TimeoutError, asyncio.TimeoutError):
        conn.answer(req, 504, "CONNECT target did not answer in time", "timeout")
        return
    except OSError as e:
        conn.answer(req, 502, f"CONNECT target refused: {e.strerror or e}", "refused")
        return
    if req.done or conn.transport.is_closing():  # the client left while we were connecting
        tunnel.abort("closed", "downstream_closed")
        return
    req.status = 200
    conn.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    conn.upgraded(req, None, b"", tunnel)

"""The client-facing side: one `Downstream` per accepted connection (proxy/request.py: one `Request` per exchange).

Requests are parsed with httptools as they arrive and queued in order (pipelining);
the first in the queue owns an upstream connection, later ones buffer at most
`request.PIPELINE_BUFFER_BYTES` before reading pauses. Bodies stream through as they come,
with flow control both ways: a slow reader on one side pauses reading on the other.
A connection's first bytes are sniffed once: what is not HTTP/1.x is passed through
(proxy/passthrough.py); a protocol the mesh declares for the destination replaces sniffing.
An Upgrade request keeps its Upgrade field and a 101 turns the connection into a tunnel
(proxy/tunnel.py), as does CONNECT to the outbound listener.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import MAX_HEADER_BYTES, MAX_HEADER_COUNT
from meshlens.protocols.sniff import sniff
from meshlens.proxy.headers import PEER_HEADER, forwardable, new_request_id, trace_for, upgrade_fields
from meshlens.proxy.passthrough import SNIFF_TIMEOUT, Passthrough, connect_method
from meshlens.proxy.request import PIPELINE_BUFFER_BYTES, Flow, Request, plain_response
from meshlens.proxy.tunnel import CLIENT, SERVER, Tunnel

if TYPE_CHECKING:
    from meshlens.proxy.server import Proxy
    from meshlens.proxy.upstream import Upstream

__all__ = ["HEADER_TIMEOUT", "IDLE_TIMEOUT", "Downstream"]

# Time allowed for a whole request head once its first byte arrived. nginx's
# client_header_timeout is 60 s; Envoy recommends 10 s for edge proxies (slow-loris).
HEADER_TIMEOUT = 10.0
# A kept-alive client connection with no request in flight is closed after this:
# nginx keepalive_timeout 75 s, Node 5 s; 60 s is Envoy's edge recommendation order.
IDLE_TIMEOUT = 60.0

class Downstream(asyncio.Protocol):
    """One accepted client connection; also its httptools callback object."""

    def __init__(self, proxy: Proxy, inbound: bool) -> None:
        # per connection
        self.proxy, self.inbound = proxy, inbound
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: Flow = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.peer: tuple[str, int] = ("", 0)
        self.queue: deque[Request] = deque()  # in arrival order; [0] is answered next
        self.write_paused = False
        self.closing = False  # answer what is in flight, then close (Connection: close, drain, errors)
        self.broken = False  # parsing stopped for good
        self.timer: asyncio.TimerHandle | None = None  # fires at or before `deadline`; re-armed lazily
        self.deadline = 0.0  # loop time when `on_deadline` runs; 0 = none
        self.on_deadline = self._idle_expired
        self.wbuf: list[bytes] = []  # writes gathered while corked: one send per upstream read
        self.corked = False
        self.original_dst: tuple[str, int] | None = None  # where iptables meant it to go (transparent outbound)
        self.t_wall = self.t0 = 0  # when it was accepted: a passthrough's record starts there
        self.sniffing = True  # until the first bytes tell HTTP/1.x (parsed from then on) from the rest
        self.sniffed = b""  # first bytes while they cannot tell yet (< SNIFF_MAX_BYTES)
        self.held: bytearray | None = None  # bytes after an Upgrade request head, until its response decides
        self.tunnel: Tunnel | None = None  # the connection is a tunnel now (passthrough or upgraded)
        self.client_eof = False
        # per request being parsed
        self.current: Request | None = None
        self.url = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.in_head = False

    @property
    def has_destination(self) -> bool:
        """Whether the connection goes somewhere whatever it carries: the app (inbound), or where
        iptables meant it to go (transparent outbound). Explicit outbound is routed by HTTP only."""
        return self.inbound or self.original_dst is not None

    def __repr__(self) -> str:
        return f"<Downstream {self.peer} queue={len(self.queue)} closing={self.closing}>"

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = Flow(self.transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        self.t_wall, self.t0 = time.time_ns(), time.monotonic_ns()
        self.proxy.opened(self)
        declared = self.proxy.declared_protocol(self)  # mesh.yaml's protocol replaces sniffing
        if declared == "http/1.1":
            self.sniffing = False
            self._arm(self.proxy.config.idle_timeout, self._idle_expired)
        elif declared is not None and not self.closing:
            self._pass(declared, b"")
        else:
            self._arm(min(SNIFF_TIMEOUT, self.proxy.config.idle_timeout), self._sniff_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for req in self.queue:
            if not req.done:
                req.error = req.error or "downstream_closed"
                req.done = True
                if req.upstream is not None:
                    req.upstream.abort()  # half-forwarded: the connection cannot be reused
                self.proxy.record(req, self)
        self.queue.clear()
        self.proxy.closed(self)

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it sent, then close (returning None closes now)."""
        self.closing = True
        self.client_eof = True
        return True if self.queue or self.current is not None else None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue and self.queue[0].upstream is not None and self.queue[0].upstream.transport is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue and self.queue[0].upstream is not None and self.queue[0].upstream.transport is not None:
            self.queue[0].upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            if self.held is not None:
                self._hold(data)
            return
        if self.sniffing:
            data = self._sniff(data)  # type: ignore[assignment]
            if not data:
                return
        if self.current is None and self.deadline and self.on_deadline == self._idle_expired:
            self._arm(self.proxy.config.header_timeout, self._header_expired)  # the first bytes of a request head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            req = self.queue[-1] if self.queue else None
            if req is not None and req.upgrade and not req.done:
                # llhttp stops at an Upgrade head (a declared body included: Node reads it the same
                # way): what follows belongs to the new protocol if the answer is 101, else is HTTP again
                self.broken = True
                self.held = bytearray()
                self._hold(data[e.args[0]:])
            else:  # CONNECT (answered 405), or an upgrade answered locally: nothing more is read
                self._stop_reading()
        except httptools.HttpParserError as e:
            cause = e.__context__
            err = cause if isinstance(cause, PeerError) else PeerError(f"malformed request: {e}")
            req = self.current or Request(self)
            self.current = None
            self.queue.append(req)
            self._stop_reading()
            self.answer(req, err.status, str(err), "protocol_error") if len(self.queue) == 1 else \
                self._set_local(req, err.status, str(err), "protocol_error")

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request(self)
        self.url.clear()
        self.headers = []
        self.trailers = []
        self.head_bytes = 0
        self.in_head = True
        if self.on_deadline != self._header_expired or not self.deadline:
            self._arm(self.proxy.config.header_timeout, self._header_expired)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if not self.in_head:
            self.trailers.append((name, value))
            return
        self.headers.append((name, value))
        if len(self.headers) > MAX_HEADER_COUNT:
            raise PeerError(f"more than MAX_HEADER_COUNT={MAX_HEADER_COUNT} header fields", status=431)

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEADER_BYTES:
            raise PeerError(f"request head exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}", status=431)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.in_head = False
        req = self.current
        assert req is not None
        parser = self.parser
        req.method = parser.get_method().decode("ascii")
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive() and req.version == "1.1" and not self.closing
        target = bytes(self.url)
        self.queue.append(req)
        if req.method == "CONNECT":
            req.keep_alive = False  # after a CONNECT the connection is a tunnel, or closed
            if self.has_destination:
                self._set_local(req, 405, "CONNECT is served only by the outbound listener as an explicit proxy",
                                "protocol_error")
            else:
                self._prepare_connect(req, target)
        else:
            self._prepare(req, target)
            if req.head and parser.should_upgrade():  # RFC 9110 7.8: Upgrade crosses this hop on purpose
                req.upgrade = True
                req.head = req.head[:-2] + upgrade_fields(self.headers) + b"\r\n"
        if not req.keep_alive:
            self.closing = True
        if len(self.queue) == 1:
            self._start(req)

    def _prepare(self, req: Request, target: bytes) -> None:
        host = b""
        traceparent = request_id = None
        peer = b""
        kept: list[tuple[bytes, bytes]] = []
        for n, v in self.headers:  # the three fields the proxy reads; the rest pass as they are
            c = n[:1]
            if c in b"hHtTxX":
                ln = n.lower()
                if ln == b"traceparent":
                    traceparent = v
                    continue
                if ln == PEER_HEADER:  # sidecar to sidecar: read, never forwarded as received
                    peer = v
                    continue
                if ln == b"host":
                    host = v
                elif ln == b"x-request-id":
                    request_id = v
            kept.append((n, v))
        fields, req.chunked, _ = forwardable(kept)
        out = [fields]
        path_target, authority = _split_target(target)
        req.authority = (host or authority).decode("latin-1")
        q = path_target.find(b"?")
        req.path = (path_target if q < 0 else path_target[:q]).decode("latin-1")
        req.trace = trace = trace_for(traceparent)
        out.append(b"traceparent: " + trace.header() + b"\r\n")
        if request_id is None:
            request_id = new_request_id()
            out.append(b"x-request-id: " + request_id + b"\r\n")
        req.request_id = request_id
        if not self.inbound:
            out.append(self.proxy.peer_field)
        if req.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        route = self.proxy.route(self, authority or host, peer)
        if isinstance(route, tuple):
            self._set_local(req, *route)
            return
        req.route = route
        req.head = b"%b %b HTTP/1.1\r\n%b\r\n" % (req.method.encode(), path_target, b"".join(out))

    def _prepare_connect(self, req: Request, target: bytes) -> None:
        """CONNECT host:port from the app to its sidecar (an explicit proxy): routed like a Host."""
        req.authority = target.decode("latin-1")
        req.upgrade = True
        route = self.proxy.route(self, target)
        if isinstance(route, tuple):
            self._set_local(req, *route)
        else:
            req.route = route

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.body(body)

    def on_message_complete(self) -> None:
        req, self.current = self.current, None
        if req is not None:
            req.body_end(self.trailers)
        if self.closing:
            self._stop_reading()  # RFC 9112 9.6: nothing is read after a request with Connection: close

    # -- exchange lifecycle ---------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        if req.local is not None:
            self.write(req.local)
            self.finished(req)
            return
        assert req.route is not None
        if req.method == "CONNECT":
            asyncio.get_running_loop().create_task(connect_method(self, req))
            return
        up = self.proxy.pool.take(req.route.addr)
        if up is not None:
            req.attach(up)
        else:
            asyncio.get_running_loop().create_task(self._connect(req))

    async def _connect(self, req: Request) -> None:
        assert req.route is not None
        try:
            up = await self.proxy.pool.connect(req.route.addr)
        except ConnectionRefusedError:
            self.answer(req, 503, "upstream connect error: connection refused", "refused")
        except (TimeoutError, asyncio.TimeoutError):
            self.answer(req, 503, "upstream connect error: timed out", "timeout")
        except OSError as e:
            self.answer(req, 503, f"upstream connect error: {e.strerror or e}", "refused")
        else:
            if req.done:
                self.proxy.pool.release(up)
            else:
                req.attach(up)

    def _set_local(self, req: Request, status: int, text: str, error: str) -> None:
        # 508: the connection itself loops back into this proxy; keeping it would loop again.
        close = status in (400, 408, 431, 508) or not req.keep_alive
        req.local = plain_response(status, text, close)
        req.status, req.error = status, error
        if close:
            req.close_after = True
            self.closing = True

    def answer(self, req: Request, status: int, text: str, error: str) -> None:
        """Answer `req` (the first in the queue) with a plain-text error of our own."""
        if req.done:
            return
        self._set_local(req, status, text, error)
        if self.queue and self.queue[0] is req:
            self.write(req.local)  # type: ignore[arg-type]
            self.finished(req)

    def finished(self, req: Request, abort: bool = False) -> None:
        if req.done:
            return
        req.done = True
        self.proxy.record(req, self)
        if self.queue and self.queue[0] is req:
            self.queue.popleft()
        self.uncork()
        if abort:
            self.transport.abort()
            return
        if req.close_after or (self.closing and not self.queue):
            self.closing = True
            self.transport.close()
            return
        # whatever paused reading on behalf of this exchange is over; the next one pauses anew if it must
        self.flow.resume("upstream")
        self.flow.resume("buffer")
        if self.held is not None:  # an Upgrade answered without 101: what the client sent after it is HTTP
            held, self.held = bytes(self.held), None
            self.broken = False
            self.flow.resume("upgrade")
            if held:
                self.data_received(held)
                return
        if self.queue:
            self._start(self.queue[0])
        elif self.current is None:
            self._arm(self.proxy.config.idle_timeout, self._idle_expired)

    def _stop_reading(self) -> None:
        self.broken = True
        self.closing = True
        self.flow.pause("closing")

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, then close (tunnels run until the drain timeout)."""
        if self.tunnel is not None:
            return
        self.closing = True
        if not self.queue and self.current is None:
            self.transport.close()

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, delay: float, fn) -> None:  # type: ignore[no-untyped-def]
        # one call_at per connection, moved only when it would fire too late: re-arming on
        # every request would cost a timer-heap insert and cancel per exchange
        loop = asyncio.get_running_loop()
        self.deadline = deadline = loop.time() + delay
        self.on_deadline = fn
        if self.timer is not None and self.timer.when() > deadline:
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = loop.call_at(deadline, self._on_timer)

    def _disarm(self) -> None:
        self.deadline = 0.0

    def _on_timer(self) -> None:
        self.timer = None
        if not self.deadline:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._on_timer)
            return
        self.deadline = 0.0
        self.on_deadline()

    # -- writes -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.corked:
            self.wbuf.append(data)
        else:
            self.transport.write(data)

    def cork(self) -> None:
        self.corked = True

    def uncork(self) -> None:
        self.corked = False
        wbuf = self.wbuf
        if wbuf:
            self.transport.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))
            wbuf.clear()

    # -- not HTTP, or not any more ---------------------------------------------------------------

    def _sniff(self, data: bytes) -> bytes | None:
        """The first bytes: HTTP/1.x is returned to be parsed (from then on, unsniffed); the rest passes through."""
        head = self.sniffed + data if self.sniffed else data
        proto = sniff(head)
        if proto == "http/1.1":
            self.sniffing = False
            self.sniffed = b""
            return head
        if proto == "need_more":  # a prefix of a method or of the h2 preface: the header timeout bounds the wait
            if not self.sniffed:
                self._arm(self.proxy.config.header_timeout, self._header_expired)
            self.sniffed = head
            return None
        self._pass(proto, head)
        return None

    def _pass(self, protocol: str, first: bytes) -> None:
        self.sniffing = False
        self.sniffed = b""
        self.broken = True  # the HTTP parser never sees this connection
        self._disarm()
        Passthrough(self, protocol).start(first)

    def _sniff_expired(self) -> None:
        """Nothing sent yet: a server-first protocol, passed through if there is a destination; else idle."""
        if not self.sniffing or self.sniffed or self.current is not None:
            return
        remaining = self.proxy.config.idle_timeout - SNIFF_TIMEOUT
        if remaining <= 0:
            self._idle_expired()
        elif self.has_destination and not self.proxy.draining:
            self._pass("tcp", b"")
        else:
            self._arm(remaining, self._idle_expired)

    def _hold(self, data: bytes) -> None:
        held = self.held
        assert held is not None
        held += data
        if len(held) > PIPELINE_BUFFER_BYTES:
            self.flow.pause("upgrade")

    def upgraded(self, req: Request, up: Upstream | None, rest: bytes, tunnel: Tunnel | None = None) -> None:
        """The upstream answered 101 (head already written): both connections become one tunnel.

        `rest`: the upstream's bytes after its head; `tunnel`: one whose server end is already
        connected (CONNECT), instead of `up`. Recorded as `req` when the tunnel ends."""
        self._disarm()
        held, self.held = bytes(self.held or b""), None
        if tunnel is None:
            assert up is not None and up.transport is not None
            tunnel = Tunnel(self.proxy.config.idle_timeout, lambda t: self.tunnel_closed(req, t))
            tunnel.server.adopt(up.transport, up.write_paused)
        self.tunnel = tunnel
        tunnel.client.adopt(self.transport, self.write_paused)
        tunnel.send(CLIENT, rest)
        tunnel.send(SERVER, held)
        if self.client_eof:  # half-closed while the upgrade was pending: the upstream is told now
            tunnel.client.eof_received()
        tunnel.start()

    def tunnel_closed(self, req: Request, tunnel: Tunnel) -> None:
        req.request_bytes += tunnel.bytes[CLIENT]
        req.response_bytes += tunnel.bytes[SERVER]
        req.error = req.error or tunnel.error
        req.done = True
        self.queue.clear()
        self.proxy.record(req, self)
        self.proxy.closed(self)

    def _idle_expired(self) -> None:
        if not self.queue and self.current is None:
            self.transport.close()

    def _header_expired(self) -> None:
        self.proxy.stats["downstream_rq_header_timeout"] += 1
        req = self.current or Request(self)
        self.current = None
        self._stop_reading()
        self.queue.append(req)
        if len(self.queue) == 1:
            self.answer(req, 408, f"request head not received within {self.proxy.config.header_timeout:g}s", "timeout")
        else:
            self._set_local(req, 408, "request head timeout", "timeout")


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """(origin-form target, authority) from an origin- or absolute-form request target."""
    if target.startswith((b"http://", b"https://")):
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        q = rest.find(b"?")
        cut = min(i for i in (slash, q, len(rest)) if i >= 0)
        path = rest[cut:]
        return (path if path.startswith(b"/") else b"/" + path), rest[:cut]
    return target, b""

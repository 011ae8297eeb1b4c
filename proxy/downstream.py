"""The client-facing shell: one `Downstream` per accepted connection.

Thin by design: it feeds the client's bytes to the codec (`RequestReader`), makes one
`Exchange` per request head (proxy/exchange.py: the order of everything else), keeps
them in arrival order (pipelined requests are answered one after another, as nginx
does), writes what they answer, and owns the connection's flow control and timers.
A connection's first bytes are sniffed once: what is not HTTP/1.x is passed through
(proxy/passthrough.py); a protocol the mesh declares for the destination replaces
sniffing. A 101 or a CONNECT turns the connection into a tunnel (proxy/tunnel.py).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import MAX_PENDING_EXCHANGES, Phase, RequestHead, RequestReader
from meshlens.protocols.sniff import sniff
from meshlens.protocols.tls import HelloParser
from meshlens.proxy.connect import DC, DPE, NR, LocalReply
from meshlens.proxy.exchange import Exchange, State, plain_response
from meshlens.proxy.h2_downstream import H2Downstream, h2c_settings
from meshlens.proxy.h2_fields import grpc_of_h1
from meshlens.proxy.headers import PEER_HEADER, response_head
from meshlens.proxy.mtls import MESH_ALPN, TlsServer, handshake_reason
from meshlens.proxy.passthrough import SNIFF_TIMEOUT, Passthrough, connect_method
from meshlens.proxy.router import Route
from meshlens.proxy.routing import field_value
from meshlens.proxy.tunnel import CLIENT, SERVER, Tunnel

if TYPE_CHECKING:
    from meshlens.proxy.server import Proxy
    from meshlens.proxy.upstream import Upstream

__all__ = ["HEADER_TIMEOUT", "IDLE_TIMEOUT", "MAX_QUEUED", "Downstream"]

# Time allowed for a whole request head once its first byte arrived. nginx's
# client_header_timeout is 60 s; Envoy recommends 10 s for edge proxies (slow-loris).
HEADER_TIMEOUT = 10.0
# A kept-alive client connection with no request in flight is closed after this:
# nginx keepalive_timeout 75 s, Node 5 s; 60 s is Envoy's edge recommendation order.
IDLE_TIMEOUT = 60.0
# Pipelined requests read ahead of the one being answered before the client is not read
# any further (nginx reads one buffer ahead); far below the codec's MAX_PENDING_EXCHANGES.
MAX_QUEUED = 16
# Counters of this module's own that the process' stats do not declare (/stats shows them from 0, proxy/admin.py):
# an mTLS handshake the client left unfinished (closed, or silent past header_timeout), and first bytes that look
# like TLS but are no ClientHello one can read (garbage, or over MAX_HELLO_BYTES: passed through, as Envoy's TLS
# inspector counts tls_not_found and client_hello_too_large and lets the connection go on).
_EXTRA = frozenset({PEER_HEADER})
_IDLE_PHASE, _HEAD_PHASE, _UPGRADE_WAIT = Phase.IDLE, Phase.HEAD, Phase.UPGRADE_WAIT
_NO_TIMER, _IDLE_TIMER, _HEAD_TIMER, _SNIFF_TIMER = 0, 1, 2, 3
assert MAX_QUEUED < MAX_PENDING_EXCHANGES


class Downstream(asyncio.Protocol):
    """One accepted client connection; also the consumer of its RequestReader."""

    speaks_h2 = False
    """An HTTP/1.1 client (an HTTP/2 stream's `Stream` says True)."""

    def __init__(self, proxy: Proxy, inbound: bool) -> None:
        # per connection
        self.proxy, self.inbound = proxy, inbound
        self.env = proxy.envs[inbound]
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = RequestReader(self, extra=_EXTRA)
        self.peer: tuple[str, int] = ("", 0)
        self.queue: deque[Exchange] = deque()  # in arrival order; [0] is answered next
        self.reading: Exchange | None = None  # the request whose body is being read
        self.paused: set[str] = set()  # why the client is not read: buffer, upstream, queue, closing
        self.write_paused = False
        self.closing = False  # answer what is in flight, then close (Connection: close, drain, errors)
        self.timer: asyncio.TimerHandle | None = None  # fires at or before `deadline`; re-armed lazily
        self.deadline = 0.0  # loop time when the timer of kind `timer_kind` runs out; 0 = none
        self.timer_kind = _NO_TIMER
        self.wbuf: list[bytes] = []  # writes gathered while corked: one send per upstream read
        self.corked = False
        self.original_dst: tuple[str, int] | None = None  # where iptables meant it to go (transparent outbound)
        self.t_wall = self.t0 = 0  # when it was accepted: a passthrough's record starts there
        self.sniffing = True  # until the first bytes tell HTTP/1.x (parsed from then on) from the rest
        self.sniffed = b""  # first bytes while they cannot tell yet
        self.tunnel: Tunnel | None = None  # the connection is a tunnel now (passthrough or upgraded)
        self.h2: H2Downstream | None = None  # the connection speaks HTTP/2: that shell has its transport now
        self.passthrough = False
        self.client_eof = False
        self.tls: TlsServer | None = None  # mTLS terminated here (proxy/mtls.py): self.transport is its plaintext side
        self.hello: HelloParser | None = None  # reading a ClientHello, to tell mesh mTLS from other TLS
        self.peer_identity = ""  # the verified SPIFFE id of an mTLS client
        self.handshake_over = False  # the mTLS handshake succeeded, or its failure is recorded (once)
        self.mtls = "PERMISSIVE"  # inbound: the PeerAuthentication mode for the app's port (proxy/authz.py)
        self.mtls_mode_of: str | None = None  # inbound: the service's mode it runs in (None: observe, nothing applied)
        self.mtls_note = ""  # what STRICT did (refused_plaintext) or would have done (would_refuse_plaintext)

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
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        self.t_wall, self.t0 = time.time_ns(), time.monotonic_ns()
        self.proxy.opened(self)
        mtls = False
        if self.inbound:
            self.mtls, self.mtls_mode_of = self.proxy.inbound_mtls()
            mtls = self.proxy.mtls_server() is not None and self.mtls != "DISABLE"
        declared = self.proxy.declared_protocol(self)  # mesh.yaml's protocol replaces sniffing
        if mtls and declared in ("http/1.1", "tls"):
            declared = None  # sniffed all the same: mTLS comes first (what it carries is sniffed after)
        if declared == "http/1.1" and self.mtls == "STRICT" and self.mtls_mode_of is not None:
            declared = None  # STRICT without an identity to terminate with: plaintext is judged by the sniff
        if declared == "http/1.1":
            self.sniffing = False
            self._arm(self.proxy.config.idle_timeout, _IDLE_TIMER)
        elif declared is not None and not self.closing:
            self._pass(declared, b"")
        else:
            self._arm(min(SNIFF_TIMEOUT, self.proxy.config.idle_timeout), _SNIFF_TIMER)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tls is not None and not self.handshake_over:
            self._tls_unfinished("the connection closed during the handshake")
        elif self.tls is not None and self.tls.error is not None:  # after the handshake: a record that did not decrypt
            self.proxy.stats["downstream_cx_tls_record_error"] += 1
            self.proxy.recording.connection(self, "tls", self.proxy.router.inbound(self.peer[0]), None, "tls_record",
                                            "", None, {"tls_error": handshake_reason(self.tls.error)})
        self.deadline = 0.0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.tunnel is None:
            for ex in list(self.queue):
                ex.abandon("downstream_closed", DC)
            if self.reading is not None and self.reading not in self.queue:
                self.reading = None
        self.queue.clear()
        self.proxy.closed(self)

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it sent, then close (returning None closes now)."""
        self.closing = True
        self.client_eof = True
        if self.tunnel is not None:
            return True
        if self.reader.phase is not _UPGRADE_WAIT:  # held bytes still go to the tunnel if it opens
            if self.reader.feed_eof() and self.reading is not None:
                # it left in the middle of a request body, which can now never end: the connection and whatever
                # went upstream are cut and the exchanges recorded downstream_closed (DC), as Envoy resets them
                self.abort()
                return None
        return True if self.queue else None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            up = self.queue[0].upstream
            if up is not None:
                up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            up = self.queue[0].upstream
            if up is not None:
                up.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.sniffing:
            data = self._sniff(data)  # type: ignore[assignment]
            if not data:
                return
        try:
            self.reader.feed(data)
        except PeerError as e:
            self._refuse(LocalReply(e.status, str(e), "protocol_error", DPE))
            return
        if self.reader.phase is _HEAD_PHASE and self.timer_kind != _HEAD_TIMER:
            # part of a head is held: from its first bytes it has header_timeout to complete (a whole
            # head in one read, the common case, never arms this timer)
            self._arm(self.proxy.config.header_timeout, _HEAD_TIMER)

    # -- the codec's callbacks ---------------------------------------------------------------

    def on_request(self, head: RequestHead) -> None:
        if self.timer_kind == _HEAD_TIMER:
            self.deadline, self.timer_kind = 0.0, _NO_TIMER
        ex = Exchange(self, self.env, head)
        if self.peer_identity:
            ex.peer_identity = self.peer_identity
        if self.mtls_note:
            ex.actions = (self.mtls_note,)
        self.reading = ex
        queue = self.queue
        queue.append(ex)
        if not head.keep_alive:
            self.closing = True  # RFC 9112 9.6: nothing is read after Connection: close (the codec stops)
        if len(queue) == 1:
            self._start(ex)
        elif len(queue) >= MAX_QUEUED:
            self.pause_reading("queue")

    def on_request_body(self, data: bytes) -> None:
        ex = self.reading
        if ex is not None:
            ex.request_body(data)

    def on_request_end(self, head: RequestHead, body_bytes: int) -> None:
        ex, self.reading = self.reading, None
        if ex is not None:  # Exchange.request_end, inline: once per request
            ex.request_done = True
            ex.request_bytes = body_bytes
            if ex.upstream_h2 and ex.upstream is not None and ex.state is State.SENT:
                ex.upstream.end_request()
            if ex.mirror_to is not None:
                ex.send_mirror()

    # -- exchanges -----------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        head = ex.head
        if ex.refused is not None:  # the client broke HTTP in it, or never finished its head (408)
            ex.reply(ex.refused)
            return
        peer = head.extra.get(PEER_HEADER, b"") if head.extra is not None else b""
        if head.upgrade and head.method != "CONNECT" and self._upgrade_h2c(ex):
            return
        if head.method == "CONNECT":
            ex.close_after = True  # after a CONNECT the connection is a tunnel, or closed
            if self.has_destination:
                ex.reply(LocalReply(405, "CONNECT is served only by the outbound listener as an explicit proxy",
                                    "protocol_error", DPE))
                return
            route = self.proxy.router.outbound(head.target)
            if isinstance(route, LocalReply):
                ex.reply(route)
                return
            ex.tunnel_connecting(route)
            self.proxy.loop.create_task(connect_method(self, ex))
            return
        route = self.route(head, peer)
        if self.proxy.h2_services and type(route) is Route and route.dst_service in self.proxy.h2_services:
            ex.upstream_h2 = True  # declared grpc or http2: the request goes on as HTTP/2 (proxy/h2_upstream.py)
            if grpc_of_h1(head):  # a gRPC call over HTTP/1.1: recorded and judged by its grpc-status, as over h2
                ex.protocol = "grpc"
                if head.deadline is not None:  # its grpc-timeout, honoured as an HTTP/2 client's
                    ex.deadline(head.deadline, "")
        ex.start(route)

    def route(self, head: RequestHead, peer: bytes = b"") -> Route | LocalReply:
        """Where a request goes (an HTTP/2 stream's too): inbound the app, outbound by its authority.
        `peer`: the x-meshlens-peer it carries."""
        router = self.proxy.router
        if self.inbound:
            return router.inbound(self.peer[0], peer)
        target = head.target
        authority = head.host or b""
        if target[:1] != b"/" and b"://" in target:  # RFC 9112 3.2.2: absolute-form's authority wins
            authority = target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0] or authority
        return router.outbound(authority, peer, self.original_dst, head)

    def exchange_done(self, ex: Exchange) -> None:
        """`ex` ended, however it ended: record it, then the next request's turn (or the close)."""
        self.proxy.recording.exchange(ex, self)
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        elif ex in queue:
            queue.remove(ex)
        if self.wbuf:
            self.uncork()
        self.corked = False
        if self.transport.is_closing():
            return
        if ex.close_after or (self.closing and not queue and self.reading is None):
            self.closing = True
            self.transport.close()
            return
        if "queue" in self.paused and len(queue) < MAX_QUEUED:
            self.resume_reading("queue")
        self.resume_reading("upstream")
        reader = self.reader
        if reader.phase is _UPGRADE_WAIT and ex.head.upgrade:  # an Upgrade answered without 101
            reader.upgrade_answered(False)  # what the client sent after it is HTTP again
        if queue:
            self._start(queue[0])
        elif self.reading is None and reader.phase is _IDLE_PHASE and not reader.held:
            self._arm(self.proxy.config.idle_timeout, _IDLE_TIMER)

    def _refuse(self, reply: LocalReply) -> None:
        """The client broke HTTP (or timed out): answer it when its turn comes, read nothing more."""
        self.pause_reading("closing")
        self.closing = True
        ex = self.reading
        if ex is None:
            ex = Exchange(self, self.env, RequestHead())
            self.queue.append(ex)
        self.reading = None
        ex.close_after = True
        if self.queue and self.queue[0] is ex:
            if ex.state is State.RESPONDING or ex.state is State.TUNNEL:
                ex.abandon(reply.error, reply.flags)  # a response is on its way: the connection is cut
                self.abort()
            else:
                ex.cut(reply)  # whatever went upstream is cut; the client hears why
        else:
            ex.refused = reply

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, then close (tunnels run until the drain timeout)."""
        if self.tunnel is not None:
            return
        if self.h2 is not None:
            self.h2.drain()
            return
        self.closing = True
        if not self.queue:
            self.transport.close()

    # -- flow control ------------------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        paused = self.paused
        if reason in paused:
            paused.discard(reason)
            if not paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- writes -------------------------------------------------------------------------------

    def write_head(self, head: object, close: bool) -> None:
        """A response head (an HTTP/2 upstream's carries its HTTP/1.1 bytes, proxy/h2_upstream.py)."""
        self.write(response_head(head, close))  # type: ignore[arg-type]

    def write_local(self, reply: LocalReply, close: bool) -> bytes:
        """A reply of the sidecar's own, written; returns its bytes (the exchange's `local`)."""
        out = plain_response(reply.status, reply.text, close, reply.headers)
        self.write(out)
        return out

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

    def abort(self) -> None:
        self.uncork()
        self.transport.abort()

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, delay: float, kind: int) -> None:
        # one call_at per connection, moved only when it would fire too late: re-arming on
        # every request would cost a timer-heap insert and cancel per exchange
        loop = self.proxy.loop  # not asyncio.get_running_loop(): it asks the kernel for the pid each time
        self.deadline = deadline = loop.time() + delay
        self.timer_kind = kind
        if self.timer is not None and self.timer.when() > deadline:
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        self.deadline, self.timer_kind = 0.0, _NO_TIMER
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if not self.deadline:
            return
        loop = self.proxy.loop
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._on_timer)
            return
        kind, self.deadline, self.timer_kind = self.timer_kind, 0.0, _NO_TIMER
        if kind == _IDLE_TIMER:
            if not self.queue and self.reading is None:
                self.transport.close()
        elif kind == _HEAD_TIMER and self.tls is not None and not self.handshake_over:
            self._tls_unfinished(f"no handshake within header_timeout={self.proxy.config.header_timeout:g}s")
            self.abort()
        elif kind == _HEAD_TIMER:
            self.proxy.stats["downstream_rq_header_timeout"] += 1
            self._refuse(LocalReply(408, f"request head not received within {self.proxy.config.header_timeout:g}s",
                                    "timeout"))
        elif kind == _SNIFF_TIMER:
            self._sniff_expired()

    # -- not HTTP, or not any more ---------------------------------------------------------------

    def _sniff(self, data: bytes) -> bytes | None:
        """The first bytes: HTTP/1.x is returned to be parsed (from then on, unsniffed); the rest passes through."""
        head = self.sniffed + data if self.sniffed else data
        proto = sniff(head)
        if proto == "http/1.1":
            if self.tls is None and self._strict_refuses(proto):
                return None
            self.sniffing = False
            self.sniffed = b""
            self._arm(self.proxy.config.header_timeout, _HEAD_TIMER)
            return head
        if proto == "tls" and self.inbound and self.tls is None and self.mtls != "DISABLE" \
                and self.proxy.mtls_server() is not None:
            return self._hello(head, data)
        if proto != "need_more" and self.tls is None and self._strict_refuses(proto):
            return None
        if proto == "need_more":  # a prefix of a method or of the h2 preface: the header timeout bounds the wait
            if not self.sniffed:
                self._arm(self.proxy.config.header_timeout, _HEAD_TIMER)
            self.sniffed = head
            return None
        self._pass(proto, head)
        return None

    def _hello(self, head: bytes, data: bytes) -> None:
        """Inbound TLS, with this sidecar holding an identity: the whole ClientHello tells mesh mTLS (terminated
        here) from other TLS (passed through, as before), as Envoy's TLS inspector does."""
        parser = self.hello
        if parser is None:
            parser = self.hello = HelloParser("client")
            data = head  # the first call: everything read so far
            self._arm(self.proxy.config.header_timeout, _HEAD_TIMER)
        try:
            hello = parser.feed(data)
        except PeerError:
            hello = False  # not a hello we can read: passed through, the record says why
            self.proxy.stats["downstream_cx_tls_hello_invalid"] += 1
        if hello is None:
            self.sniffed = head
            return None
        self.hello = None
        if hello and any(p in MESH_ALPN for p in hello.alpn):  # type: ignore[union-attr]
            self._terminate(head)
        elif not self._strict_refuses("tls"):
            self._pass("tls", head)
        return None

    def peer_authentication_changed(self, mtls: str, mode_of: str | None) -> None:
        """A snapshot changed the inbound PeerAuthentication under this open connection, not mTLS: one still
        sniffing is judged by the new one; a plaintext one that STRICT now refuses is drained, enforced (what is
        in flight finishes, then it closes, as Envoy drains the connections of a filter chain an update took
        away), and its next calls say would_refuse_plaintext in dry-run; one no longer under STRICT is left
        alone from its next call."""
        self.mtls, self.mtls_mode_of = mtls, mode_of
        if self.sniffing:
            return
        if mtls != "STRICT" or mode_of is None:
            self.mtls_note = ""
        elif mode_of != "enforce":
            self.mtls_note = "would_refuse_plaintext"
        elif not self.closing:
            self.mtls_note = ""
            self.proxy.stats["downstream_cx_plaintext_drained"] += 1
            if self.tunnel is not None:  # passed through or upgraded: no exchange boundary to wait for
                self.tunnel.close("closed")
            else:
                self.drain()

    def _strict_refuses(self, protocol: str) -> bool:
        """Inbound under a STRICT PeerAuthentication, what is not mTLS: enforced, the connection is refused (True:
        recorded and closed, as Envoy closes a connection no filter chain matches); in dry-run it goes on, each of
        its calls saying would_refuse_plaintext."""
        if not self.inbound or self.mtls != "STRICT" or self.mtls_mode_of is None:
            return False
        if self.mtls_mode_of != "enforce":
            self.mtls_note = "would_refuse_plaintext"
            return False
        self.mtls_note = "refused_plaintext"
        self.sniffing = False
        self._cancel_timer()
        self.proxy.stats["downstream_cx_plaintext_refused"] += 1
        self.proxy.recording.connection(self, protocol, self.proxy.router.inbound(self.peer[0]), None,
                                        "plaintext_refused", NR, None, {"mtls": "STRICT"})
        self.transport.close()
        return True

    def _terminate(self, first: bytes) -> None:
        """mTLS from here on: the raw transport's protocol is a TlsServer; this shell reads and writes plaintext."""
        ctx = self.proxy.mtls_server()
        assert ctx is not None
        self.sniffed = b""
        self._cancel_timer()
        tls = self.tls = TlsServer(self.transport, ctx, self, self._tls_done)
        self.transport = tls.transport  # type: ignore[assignment]
        self._arm(self.proxy.config.header_timeout, _HEAD_TIMER)  # the handshake, then a head, within it
        tls.start(first)

    def _tls_done(self, tls: TlsServer, error: str) -> None:
        stats = self.proxy.stats
        self.handshake_over = True
        if error:
            stats["downstream_cx_tls_refused"] += 1
            self.proxy.recording.connection(self, "tls", self.proxy.router.inbound(self.peer[0]), None, "tls_handshake",
                                            "", None, {"tls_error": error})
            return
        stats["downstream_cx_mtls"] += 1
        self.peer_identity = tls.peer_identity

    def _tls_unfinished(self, why: str) -> None:
        """An mTLS handshake that never ended: recorded as a refused one is, counted apart (the client's doing)."""
        self.handshake_over = True
        self.proxy.stats["downstream_cx_tls_unfinished"] += 1
        self.proxy.recording.connection(self, "tls", self.proxy.router.inbound(self.peer[0]), None, "tls_handshake",
                                        "", None, {"tls_error": why})

    def _pass(self, protocol: str, first: bytes) -> None:
        self.sniffing = False
        self.sniffed = b""
        if protocol == "h2":  # HTTP/2 with prior knowledge: each stream one exchange (proxy/h2_downstream.py)
            self._cancel_timer()
            self.h2 = H2Downstream(self)
            self.h2.start(first)
            return
        self.passthrough = True
        self._cancel_timer()  # the tunnel adopts the transport: connection_lost, which would, never comes here
        Passthrough(self, protocol).start(first)

    def _upgrade_h2c(self, ex: Exchange) -> bool:
        """`Upgrade: h2c` (RFC 7540 3.2) on a request without a body: answered 101 here (the upgrade is this hop's),
        and the connection is HTTP/2 from now, the request its stream 1. False: not an h2c upgrade (it goes on, and
        an upstream may take or ignore what it asks); a bad HTTP2-Settings is refused 400."""
        head = ex.head
        low = head.raw.lower()
        upgrade = field_value(head.raw, low, b"upgrade") or ""
        if "h2c" not in [t.strip().lower() for t in upgrade.split(",")] or self.h2 is not None:
            return False
        if head.content_length > 0 or head.chunked:
            return False  # a body would have to be read as HTTP/1.1 first: served as HTTP/1.1, as nginx does
        settings = field_value(head.raw, low, b"http2-settings")
        payload = h2c_settings(settings.encode("latin-1") if settings is not None else None)
        if payload is None:
            ex.close_after = True
            ex.reply(LocalReply(400, "Upgrade: h2c needs one valid HTTP2-Settings field (RFC 7540 3.2.1)",
                                "protocol_error", DPE))
            return True
        self.queue.clear()
        self.reading = None
        self._cancel_timer()
        self.write(b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n")
        held = self.reader.upgrade_answered(True)
        self.h2 = H2Downstream(self)
        self.h2.upgrade(head, payload, held)
        return True

    def _sniff_expired(self) -> None:
        """Nothing sent yet: a server-first protocol, passed through if there is a destination; else idle."""
        if not self.sniffing or self.sniffed or self.queue:
            return
        remaining = self.proxy.config.idle_timeout - SNIFF_TIMEOUT
        if remaining <= 0:
            self.transport.close()
        elif self.has_destination and not self.proxy.draining:
            if not self._strict_refuses("tcp"):
                self._pass("tcp", b"")
        else:
            self._arm(remaining, _IDLE_TIMER)

    def upgraded(self, ex: Exchange, up: Upstream | None, rest: bytes, tunnel: Tunnel | None = None) -> None:
        """The upstream answered 101 (head already written), or CONNECT reached its target: both
        connections become one tunnel. `rest`: the upstream's bytes after its head; `tunnel`: one
        whose server end is already connected (CONNECT). Recorded as `ex` when the tunnel ends."""
        self._cancel_timer()
        held = self.reader.upgrade_answered(True)
        if tunnel is None:
            assert up is not None and up.transport is not None
            tunnel = Tunnel(self.proxy.config.idle_timeout, lambda t: self.tunnel_closed(ex, t))
            tunnel.server.adopt(up.transport, up.write_paused)
        self.tunnel = tunnel
        self.uncork()
        tunnel.client.adopt(self.transport, self.write_paused)
        tunnel.send(CLIENT, rest)
        tunnel.send(SERVER, held)
        if self.client_eof:  # half-closed while the upgrade was pending: the upstream is told now
            tunnel.client.eof_received()
        tunnel.start()

    def tunnel_closed(self, ex: Exchange, tunnel: Tunnel) -> None:
        ex.tunnel_ended(tunnel.bytes[CLIENT], tunnel.bytes[SERVER], tunnel.error)
        self.queue.clear()
        self.proxy.recording.exchange(ex, self)
        self.proxy.closed(self)


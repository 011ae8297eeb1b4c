"""The upstream-facing shell of HTTP/2: connections by address, each carrying many exchanges as streams.

An exchange whose upstream speaks HTTP/2 (`Exchange.upstream_h2`: its client did, or the
destination is declared grpc/http2) takes an `UpstreamStream` from the `H2Pool`: a new
stream on a connection to the endpoint that has room under the server's
SETTINGS_MAX_CONCURRENT_STREAMS, else it dials one (`H2Pool.dial`, through the proxy's one
place that opens connections, with mTLS when the endpoint is meshed); exchanges that
arrive while it connects wait for the same connection. The stream is what the exchange
holds as its `upstream`, with the interface HTTP/1.1's `Upstream` has: `send_request`,
`send`, `end_request`, `abort`, `close`, `pause_reading`.

A client that speaks HTTP/1.1 to a destination declared HTTP/2 is carried over here: its
head becomes HTTP/2 fields (h2_fields.request_fields_from_h1), a chunked body is unframed;
the response comes back as an HTTP/1.1 head and, without content-length, a chunked body
whose last chunk carries the trailers.

A GOAWAY from the server: streams above its last stream id never reached the application
and fail as a reset (a pooled connection's first such loss is retried, the exchange's
rule); the rest finish; the connection takes no new stream and closes after the last.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError

from meshlens.protocols.errors import PeerError
from meshlens.proxy.connect import LocalReply
from meshlens.proxy.h2_connection import Connection
from meshlens.proxy.h2_downstream import STREAM_BUFFER
from meshlens.proxy.h2_fields import (
    H2RequestHead,
    h1_response_head,
    request_fields,
    request_fields_from_h1,
    response_head,
    trailer_block,
    trailers_of,
    Unchunk,
)
from meshlens.proxy.pool import POOL_IDLE_TIMEOUT

if TYPE_CHECKING:
    from meshlens.proxy.exchange import Exchange

__all__ = ["ASSUMED_CONCURRENT_STREAMS", "H2Pool", "H2Upstream", "UpstreamStream"]

# Streams opened on a new connection before the server's SETTINGS say how many it takes: RFC 9113 6.5.2
# recommends servers allow at least 100; Go's HTTP/2 transport assumes 100 the same way.
ASSUMED_CONCURRENT_STREAMS = 100


class UpstreamStream:
    """One exchange's stream on an HTTP/2 upstream connection."""

    __slots__ = ("conn", "id", "ex", "head", "out", "out_bytes", "out_end", "sent_end", "unchunk", "chunked",
                 "paused", "unacked", "response_bytes", "done", "conn_paused")

    requests = 1
    idle_timeout = None

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn
        self.id = 0  # given when its HEADERS go (stream ids are sent in increasing order)
        self.ex: Exchange | None = None
        self.head: Any = None
        self.out: deque[bytes] = deque()  # request DATA waiting for the server's window
        self.out_bytes = 0
        self.out_end = False
        self.sent_end = False
        self.unchunk: Unchunk | None = None
        self.chunked = False  # the response goes to an HTTP/1.1 client chunked
        self.paused = False
        self.unacked = 0
        self.response_bytes = 0
        self.done = False
        self.conn_paused = False  # the client's shell stopped reading its request for us

    def __repr__(self) -> str:
        return f"<UpstreamStream {self.conn.addr} {self.id}>"

    @property
    def addr(self) -> tuple[str, int]:
        return self.conn.addr

    @property
    def peer_identity(self) -> str:
        return self.conn.peer_identity

    @property
    def closed(self) -> bool:
        return self.done

    # -- the exchange's side ------------------------------------------------------------------------

    def attach(self, ex: Exchange) -> None:
        self.ex = ex

    def send_request(self, ex: Exchange, body: list[bytes] | tuple[()] | None) -> None:
        conn = self.conn
        h2 = conn.h2
        head = ex.head
        if isinstance(head, H2RequestHead):
            fields = request_fields(head, ex.trace, ex.new_id, ex.env.peer_field)
        else:  # an HTTP/1.1 client, a destination that speaks HTTP/2
            fields = request_fields_from_h1(head, ex.trace, ex.new_id, ex.env.peer_field)
            if head.chunked:
                self.unchunk = Unchunk()
        try:
            self.id = h2.get_next_available_stream_id()
            h2.send_headers(self.id, fields, end_stream=ex.request_done and not body)
        except ProtocolError:  # the connection went away meanwhile: as a reset before any byte was read
            self._lost()
            return
        conn.streams[self.id] = self
        if ex.request_done and not body:
            self.sent_end = self.out_end = True
        for piece in body or ():
            self.send(piece)
        if ex.request_done:
            self.end_request()
        conn.dirty()

    def send(self, data: bytes) -> None:
        if self.unchunk is not None:
            data = self.unchunk.feed(data)
        if data and not self.done:
            self.out.append(data)
            self.out_bytes += len(data)
            self.pump()

    def end_request(self) -> None:
        if not self.out_end:
            self.out_end = True
            self.pump()

    def pump(self) -> None:
        """Request DATA as the server's window allows, then END_STREAM; above STREAM_BUFFER held, the client
        is not read on."""
        conn = self.conn
        h2 = conn.h2
        out = self.out
        if not self.id or self.done:
            return
        try:
            if not conn.write_paused:
                self.out_bytes -= h2.send_within_window(self.id, out)
            if not out and self.out_end and not self.sent_end:
                self.sent_end = True
                h2.end_stream(self.id)
        except (ProtocolError, StreamClosedError):  # the server reset it meanwhile (its event follows)
            out.clear()
            self.out_bytes = 0
        conn.dirty()
        ex = self.ex
        if ex is None:
            return
        if self.out_bytes > STREAM_BUFFER and not self.conn_paused:
            self.conn_paused = True
            ex.conn.pause_reading("upstream")
        elif self.conn_paused and self.out_bytes <= STREAM_BUFFER // 2:
            self.conn_paused = False
            ex.conn.resume_reading("upstream")

    def pause_reading(self) -> None:
        """The client cannot take more of the response now: its DATA is not acknowledged until it can."""
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            self._acknowledge()

    def _acknowledge(self) -> None:
        n, self.unacked = self.unacked, 0
        try:
            self.conn.h2.acknowledge_received_data(n, self.id)
        except (ProtocolError, StreamClosedError):
            pass
        self.conn.dirty()

    def abort(self) -> None:
        """The exchange no longer wants it (a retry, a timeout, the client left): the stream is cancelled."""
        self._end(ErrorCodes.CANCEL)

    def close(self) -> None:
        """The response ended: the stream is over (cancelled, if the request was still being sent)."""
        self._end(ErrorCodes.CANCEL if not self.sent_end else None)

    def _end(self, code: ErrorCodes | None) -> None:
        if self.done:
            return
        self.done = True
        self.ex = None
        conn = self.conn
        if self.id:
            if code is not None and self.id in conn.streams:
                try:
                    conn.h2.reset_stream(self.id, code)
                except (ProtocolError, StreamClosedError):
                    pass
            if self.unacked:
                self._acknowledge()
        conn.forget(self)
        conn.dirty()

    def _lost(self, protocol_error: bool = False, refused: bool = False, goaway: bool = False) -> None:
        if self.done:
            return
        ex = self.ex
        self.done = True
        self.ex = None
        self.conn.forget(self)
        if ex is not None:
            ex.upstream_lost(protocol_error, refused, goaway)

    # -- the connection's events for it ---------------------------------------------------------------------

    def on_response(self, headers: list[tuple[bytes, bytes]], alone: bool) -> None:
        ex = self.ex
        if ex is None:
            return
        try:
            head = self.head = response_head(headers, ex.method)
        except PeerError:
            self._end(ErrorCodes.PROTOCOL_ERROR)
            ex.upstream_lost(protocol_error=True)
            return
        head.alone = alone
        if not ex.conn.speaks_h2:  # an HTTP/1.1 client: the head as HTTP/1.1
            head.raw, self.chunked = h1_response_head(head)
            head.chunked = self.chunked
        if head.grpc_status >= 0:
            ex.grpc_status, ex.grpc_message = head.grpc_status, head.grpc_message
        ex.response_head(head)

    def on_data(self, data: bytes, flow: int) -> None:
        self.response_bytes += len(data)
        self.unacked += flow
        ex = self.ex
        if ex is not None and data:
            ex.response_body(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if not self.paused and self.unacked:
            self._acknowledge()

    def on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        head, ex = self.head, self.ex
        if head is None or ex is None:
            return
        trailers_of(head, trailers)
        ex.trailers = head.trailers
        if head.grpc_status >= 0:
            ex.grpc_status, ex.grpc_message = head.grpc_status, head.grpc_message

    def on_end(self) -> None:
        ex, head = self.ex, self.head
        if ex is None or head is None:
            return
        if self.chunked:
            ex.response_body(trailer_block(head.trailers))
        ex.response_end(head, self.response_bytes)

    def on_reset(self, code: int) -> None:
        self._lost(refused=code == ErrorCodes.REFUSED_STREAM)


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an upstream endpoint, and its streams."""

    def __init__(self, pool: H2Pool, addr: tuple[str, int]) -> None:
        self.pool, self.addr = pool, addr
        self.transport: asyncio.Transport | None = None
        self.h2 = Connection(client_side=True)
        self.streams: dict[int, UpstreamStream] = {}
        self.taken = 0  # streams handed out and not yet over (some not yet given an id)
        self.peer_identity = ""
        self.closed = False
        self.goaway = False  # the server's GOAWAY: no new stream here
        self.write_paused = False
        self.flushing = False
        self.idle_since = time.monotonic()
        self.waiting: list[Exchange] = []  # exchanges waiting for it to connect
        self.settings = False  # the server's first SETTINGS arrived

    def __repr__(self) -> str:
        return f"<H2Upstream {self.addr} streams={len(self.streams)} closed={self.closed}>"

    def limit(self) -> int:
        """Streams it may carry at once: the server's SETTINGS_MAX_CONCURRENT_STREAMS, and until its SETTINGS
        came, ASSUMED_CONCURRENT_STREAMS (h2 would assume no limit: a burst all on one new connection, which a
        server closes; nginx at 2 x its 128)."""
        return self.h2.remote_settings.max_concurrent_streams if self.settings else ASSUMED_CONCURRENT_STREAMS

    def room(self) -> bool:
        """Whether another stream may open here now."""
        return not self.closed and not self.goaway and self.transport is not None and self.taken < self.limit()

    def stream(self) -> UpstreamStream:
        self.taken += 1
        return UpstreamStream(self)

    def forget(self, stream: UpstreamStream) -> None:
        """`stream` is over (each stream says so once)."""
        if stream.id:
            self.streams.pop(stream.id, None)
        self.taken -= 1
        if not self.taken:
            self.idle_since = time.monotonic()
            if self.goaway:
                self.close()

    # -- asyncio --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.start()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        for stream in list(self.streams.values()):
            stream._lost()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.pump()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            self.abort(protocol_error=True)
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            stream = streams.get(getattr(event, "stream_id", 0) or 0)
            if kind is DataReceived:
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    try:
                        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    except (ProtocolError, StreamClosedError):
                        pass
            elif kind is ResponseReceived:
                if stream is not None:
                    stream.on_response(event.headers, event.stream_ended is not None)
            elif kind is TrailersReceived:
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif kind is StreamEnded:
                if stream is not None:
                    stream.on_end()
            elif kind is StreamReset:
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                if kind is RemoteSettingsChanged:
                    self.settings = True
                for s in list(streams.values()):
                    if s.out or (s.out_end and not s.sent_end):
                        s.pump()
            elif kind is ConnectionTerminated:
                self._goaway(event.last_stream_id)
        self.flush()

    def _goaway(self, last: int) -> None:
        self.goaway = True
        self.pool.forget(self)
        for sid, stream in list(self.streams.items()):
            if sid > last:  # never processed (RFC 9113 6.8): tried again on another connection
                stream._lost(refused=True, goaway=True)
        if not self.taken:
            self.close()

    # -- writes ------------------------------------------------------------------------------------------

    def dirty(self) -> None:
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.transport is None or self.transport.is_closing():
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self, protocol_error: bool = False) -> None:
        self.closed = True
        self.pool.forget(self)
        for stream in list(self.streams.values()):
            stream._lost(protocol_error)
        self.streams.clear()
        if self.transport is not None:
            self.transport.abort()


Opener = Callable[[Callable[[], H2Upstream], tuple[str, int], "Exchange"], Any]


class H2Pool:
    """HTTP/2 upstream connections by address (per process): streams are taken from them, not connections."""

    def __init__(self, stats: dict[str, int], opener: Opener | None = None) -> None:
        self.conns: dict[tuple[str, int], list[H2Upstream]] = {}
        self.connecting: dict[tuple[str, int], H2Upstream] = {}
        self.stats = stats
        self.opener = opener
        """Opens a connection for an exchange (Proxy.open_for: TLS and the server's identity): awaitable, gives the
        connected protocol or a LocalReply."""

    def __repr__(self) -> str:
        return f"<H2Pool {sum(map(len, self.conns.values()))} connections>"

    def take(self, addr: tuple[str, int]) -> UpstreamStream | None:
        """A new stream on a connection to `addr` with room, else None (the exchange dials)."""
        for conn in self.conns.get(addr, ()):
            if conn.room():
                self.stats["upstream_rq_http2_reused"] += 1
                return conn.stream()
        return None

    def release(self, stream: UpstreamStream) -> None:
        stream.close()

    def dial(self, addr: tuple[str, int], ex: Exchange) -> None:
        """A connection for `ex`: the one being opened to `addr`, if it will have room, else a new one."""
        conn = self.connecting.get(addr)
        if conn is not None and len(conn.waiting) < conn.limit():
            conn.waiting.append(ex)
            return
        conn = H2Upstream(self, addr)
        conn.waiting.append(ex)
        self.connecting[addr] = conn
        asyncio.get_running_loop().create_task(self._open(conn, ex))

    async def _open(self, conn: H2Upstream, first: Exchange) -> None:
        assert self.opener is not None
        self.stats["upstream_cx_total"] += 1
        self.stats["upstream_cx_http2_total"] += 1
        result = await self.opener(lambda: conn, conn.addr, first)
        if self.connecting.get(conn.addr) is conn:
            del self.connecting[conn.addr]
        waiting, conn.waiting = conn.waiting, []
        if isinstance(result, LocalReply):
            conn.closed = True
            for ex in waiting:
                ex.connect_failed(result)
            return
        self.conns.setdefault(conn.addr, []).append(conn)
        for ex in waiting:
            if conn.room():
                ex.connected(conn.stream())
            else:  # the server allows fewer streams than waited: the rest go elsewhere
                self.dial(conn.addr, ex)

    def forget(self, conn: H2Upstream) -> None:
        conns = self.conns.get(conn.addr)
        if conns and conn in conns:
            conns.remove(conn)

    def sweep(self) -> None:
        """Close connections without a stream for POOL_IDLE_TIMEOUT."""
        now = time.monotonic()
        for conns in list(self.conns.values()):
            for conn in list(conns):
                if not conn.taken and now - conn.idle_since >= POOL_IDLE_TIMEOUT:
                    conn.close()

    def close(self) -> None:
        for conns in list(self.conns.values()):
            for conn in list(conns):
                conn.close()
        self.conns.clear()

"""The client-facing shell of an HTTP/2 connection: each stream one exchange, as HTTP/1.1's requests are.

A `Downstream` whose first bytes are the HTTP/2 preface (sniffed, after mTLS or not; or a
destination declared grpc/http2) hands its transport to an `H2Downstream`. It feeds the bytes
to h2 (proxy/h2_connection.py), makes one `Exchange` per request HEADERS with a `Stream` as
its connection, and writes what each exchange answers as that stream's frames. The exchange
(proxy/exchange.py) is the same one HTTP/1.1 requests go through: routing, the policy chain,
retries, timeouts, the record; its upstream is an HTTP/2 stream too (proxy/h2_upstream.py).

Flow control is per stream both ways: a request's DATA is acknowledged (WINDOW_UPDATE) as it
is passed upstream, not when it arrives, so a stream whose upstream cannot take more stops
its client at STREAM_WINDOW; response DATA waits for the client's window, and past
`STREAM_BUFFER` held, the upstream stream is not read further.

Limits: MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_BYTES (proxy/h2_connection.py, enforced by
h2: a peer over them gets the connection's GOAWAY); a malformed frame is GOAWAY
PROTOCOL_ERROR and the connection's close; rapid resets (CVE-2023-44487: streams opened and
reset at once, to make the server work for nothing) close the connection with GOAWAY
ENHANCE_YOUR_CALM, as Envoy's overload manager does: of at least PREMATURE_RESET_MIN_STREAMS
streams, more than half reset by the client within PREMATURE_RESET_SECONDS of opening.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import SettingsFrame

from meshlens.protocols.errors import PeerError
from meshlens.proxy.connect import DPE, LocalReply
from meshlens.proxy.exchange import Exchange
from meshlens.proxy.h2_connection import CONNECTION_WINDOW, Connection, goaway
from meshlens.proxy.h2_fields import (
    H2ResponseHead,
    Unchunk,
    fields_of_h1_response,
    local_reply_fields,
    request_head,
    response_fields,
)
from meshlens.proxy.headers import PEER_HEADER
from meshlens.proxy.router import Route

if TYPE_CHECKING:
    from meshlens.proxy.downstream import Downstream

__all__ = ["DR", "PREMATURE_RESET_MIN_STREAMS", "PREMATURE_RESET_SECONDS", "STREAM_BUFFER", "H2Downstream", "Stream",
           "h2c_settings"]

DR = "DR"
"""Envoy's response flag: downstream remote reset (the client reset its stream)."""
# Response bytes held for one stream while its client's window is shut, before its upstream is not read on.
STREAM_BUFFER = 64 * 1024
# Envoy's overload manager: premature_reset_total_stream_count 500 and premature_reset_min_stream_lifetime_seconds
# 1; nginx closes at a fixed count of resets a connection. A connection is judged once it opened this many streams.
PREMATURE_RESET_MIN_STREAMS = 100
PREMATURE_RESET_SECONDS = 1.0


class Stream:
    """One client stream: the connection its exchange writes to (Downstream's interface, for one stream)."""

    __slots__ = ("shell", "id", "ex", "paused", "unacked", "out", "out_bytes", "end", "ended", "reset",
                 "request_bytes", "opened", "upstream_paused", "grpc", "unchunk", "corked")

    speaks_h2 = True
    """(Downstream's is False: an HTTP/2 upstream answers such a client in HTTP/1.1, proxy/h2_upstream.py.)"""
    wbuf = ()
    write_paused = False

    def __init__(self, shell: H2Downstream, stream_id: int, grpc: bool) -> None:
        self.shell, self.id, self.grpc = shell, stream_id, grpc
        self.ex: Exchange | None = None
        self.paused: set[str] = set()
        self.unacked = 0  # request bytes received and not yet acknowledged (held while paused)
        self.out: deque[bytes] = deque()  # response DATA waiting for the client's window
        self.out_bytes = 0
        self.end: list[tuple[bytes, bytes]] | bool = False  # after `out`: True, END_STREAM; a list, trailers
        self.ended = False  # our side of the stream is closed (ended, replied or reset)
        self.reset = False
        self.request_bytes = 0
        self.opened = shell.loop.time()
        self.upstream_paused = False
        self.unchunk: Unchunk | None = None  # an HTTP/1.1 upstream's chunked body, unframed for DATA
        self.corked = False  # (an HTTP/1.1 upstream sets it: nothing here is gathered)

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.ex!r}>"

    # what the exchange, its policies and the record read of a connection: the same for every stream of one
    @property
    def inbound(self) -> bool:
        return self.shell.conn.inbound

    @property
    def peer(self) -> tuple[str, int]:
        return self.shell.conn.peer

    @property
    def tls(self) -> Any:
        return self.shell.conn.tls

    @property
    def closing(self) -> bool:
        return self.shell.closing

    # -- what the exchange writes ------------------------------------------------------------------

    def write_head(self, head: Any, close: bool) -> None:
        if self.reset:
            return
        if type(head) is H2ResponseHead:
            fields, alone = response_fields(head), head.alone
        else:  # an HTTP/1.1 upstream (a destination declared http)
            fields, alone = fields_of_h1_response(head), False
            if head.chunked:
                self.unchunk = Unchunk()
        try:
            self.shell.h2.send_headers(self.id, fields, end_stream=alone)
            self.ended = alone
        except (ProtocolError, StreamClosedError):  # the client reset it meanwhile (its event follows)
            self.reset = True
        self.shell.dirty()

    def write(self, data: bytes) -> None:
        if self.unchunk is not None:
            data = self.unchunk.feed(data)
        if self.reset or not data:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.pump()

    def write_local(self, reply: LocalReply, close: bool) -> bytes:
        ex = self.ex
        extra = [tuple(line.split(b": ", 1)) for line in reply.headers.split(b"\r\n") if b": " in line]
        fields, body = local_reply_fields(reply.status, reply.text, reply.error, self.grpc, extra)  # type: ignore[arg-type]
        if self.grpc and ex is not None:
            ex.status = 200  # what the client got: a trailers-only response, its code in grpc-status
            ex.grpc_status = int(fields[2][1])
            ex.grpc_message = reply.text
        if not self.reset and not self.ended:
            h2 = self.shell.h2
            try:
                h2.send_headers(self.id, fields, end_stream=not body)
                if body:
                    self.out.append(body)
                    self.out_bytes += len(body)
                    self.end = True
                else:
                    self.ended = True
            except (ProtocolError, StreamClosedError):
                self.ended = True  # the client closed its stream meanwhile
            self.pump()
        return body

    def abort(self) -> None:
        """A response already begun cannot be finished (the upstream went, a timeout): the stream is reset."""
        if not self.reset and not self.ended:
            self.reset = True
            self.out.clear()
            try:
                self.shell.h2.reset_stream(self.id, ErrorCodes.INTERNAL_ERROR)
            except (ProtocolError, StreamClosedError):
                pass
            self.shell.dirty()

    def pump(self) -> None:
        """Send what the client's window allows; then the end; above STREAM_BUFFER held, the upstream waits."""
        shell = self.shell
        h2 = shell.h2
        out = self.out
        try:
            if not shell.write_paused:
                self.out_bytes -= h2.send_within_window(self.id, out)
            if not out and self.end and not self.ended:
                if self.end is True:
                    h2.end_stream(self.id)
                else:
                    h2.send_headers(self.id, self.end, end_stream=True)
                self.ended = True
        except (ProtocolError, StreamClosedError):  # reset by the client meanwhile
            out.clear()
            self.out_bytes = 0
            self.ended = True
        shell.dirty()
        ex = self.ex
        up = ex.upstream if ex is not None else None
        if self.out_bytes > STREAM_BUFFER and not self.upstream_paused:
            self.upstream_paused = True
            if up is not None:
                up.pause_reading()
        elif self.upstream_paused and self.out_bytes <= STREAM_BUFFER // 2:
            self.upstream_paused = False
            if up is not None:
                up.resume_reading()
        if self.ended and ex is None:
            shell.forget(self)

    # -- flow control of the request -----------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        paused = self.paused
        if reason in paused:
            paused.discard(reason)
            if not paused and self.unacked:
                self.acknowledge()

    def acknowledge(self) -> None:
        n, self.unacked = self.unacked, 0
        try:
            self.shell.h2.acknowledge_received_data(n, self.id)
        except (ProtocolError, StreamClosedError):
            pass
        self.shell.dirty()

    # -- the end ---------------------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """`ex` ended: recorded now; its stream ends once what it holds reaches the client's window."""
        shell = self.shell
        shell.conn.proxy.recording.exchange(ex, self)
        self.ex = None
        if not self.reset and not self.ended and not self.end:
            self.end = ex.trailers or True
        if self.unacked:  # the request's remaining bytes were dropped with it: the connection window reopens
            self.acknowledge()
        self.pump()

    def upgraded(self, ex: Exchange, up: Any, rest: bytes, tunnel: Any = None) -> None:
        raise AssertionError("an HTTP/2 stream is never upgraded (its upstream is HTTP/2)")


class H2Downstream(asyncio.Protocol):
    """One client connection speaking HTTP/2; the protocol of the transport it took from a Downstream."""

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.proxy = conn.proxy
        self.loop = conn.proxy.loop
        self.transport = conn.transport
        self.h2 = Connection(client_side=False)
        self.streams: dict[int, Stream] = {}
        self.closing = False  # no new streams: we sent GOAWAY (drain), or the client did
        self.goaway_sent: int | None = None
        self.write_paused = False
        self.flushing = False
        self.opened_streams = 0
        self.premature_resets = 0

    def __repr__(self) -> str:
        return f"<H2Downstream {self.conn.peer} streams={len(self.streams)} closing={self.closing}>"

    def start(self, first: bytes) -> None:
        """Take the transport over; `first`: what the client sent so far, the preface first."""
        self.proxy.stats["downstream_cx_http2_total"] += 1
        self.transport.set_protocol(self)
        self.h2.start()
        self.dirty()
        if self.proxy.draining:
            self.drain()
        if first:
            self.data_received(first)

    def upgrade(self, head: Any, settings: bytes, held: bytes) -> None:
        """After our 101 to `Upgrade: h2c`: the upgrading request is stream 1 (its request complete), `held` what
        the client sent after it (its preface, from RFC 7540 3.5)."""
        stats = self.proxy.stats
        stats["downstream_cx_http2_total"] += 1
        stats["downstream_cx_http2_upgrade"] += 1
        self.transport.set_protocol(self)
        h2 = self.h2
        h2.initiate_upgrade_connection(base64.urlsafe_b64encode(settings))
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.opened_streams += 1
        stream = self.streams[1] = Stream(self, 1, False)
        ex = stream.ex = Exchange(stream, self.conn.env, head)
        ex.protocol, ex.upstream_h2, ex.request_done = "h2", True, True
        conn = self.conn
        if conn.peer_identity:
            ex.peer_identity = conn.peer_identity
        if conn.mtls_note:
            ex.actions = (conn.mtls_note,)
        peer = head.extra.get(PEER_HEADER, b"") if head.extra is not None else b""
        ex.start(conn.route(head, peer))
        self.dirty()
        if held:
            self.data_received(held)

    # -- asyncio --------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:  # h2 prepared the GOAWAY with its code (PROTOCOL_ERROR, FLOW_CONTROL_ERROR, ...)
            self.proxy.stats["downstream_cx_http2_protocol_error"] += 1
            self._close_with_error(str(e))
            return
        transport = self.transport
        for event in events:
            if transport.is_closing():
                return  # closed for what an earlier frame of this read did: the rest is not acted on
            kind = type(event)
            if kind is DataReceived:
                self._data(event)
            elif kind is RequestReceived:
                self._request(event)
            elif kind is StreamEnded:
                stream = self.streams.get(event.stream_id)
                ex = stream.ex if stream is not None else None
                if ex is None:
                    pass
                elif not ex.request_done:
                    ex.request_end(stream.request_bytes)  # type: ignore[union-attr]
                elif ex.mirror_to is not None:  # ended with its HEADERS (_request): the mirror's turn now
                    ex.send_mirror()
            elif kind is StreamReset:
                self._reset(event)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                for stream in list(self.streams.values()):
                    if stream.out or stream.end:
                        stream.pump()
            elif kind is TrailersReceived:  # request trailers: the request's end follows (StreamEnded)
                pass
            elif kind is ConnectionTerminated:
                self.closing = True
                self._close_if_done()
        self.dirty()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        for stream in list(self.streams.values()):
            stream.reset = True
            if stream.ex is not None:
                stream.ex.abandon("downstream_closed", "DC")
        self.streams.clear()
        self.proxy.closed(self.conn)

    def eof_received(self) -> bool | None:
        self.closing = True
        return None  # HTTP/2 has no half-close of the connection: what is in flight is abandoned

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.out or stream.end:
                stream.pump()

    # -- streams -----------------------------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        conn = self.conn
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: the client retries elsewhere
            return
        self.opened_streams += 1
        try:
            head = request_head(event.headers)
        except PeerError as e:
            stream = self.streams[sid] = Stream(self, sid, False)
            ex = stream.ex = Exchange(stream, conn.env, _BAD_HEAD)
            ex.protocol = "h2"
            ex.reply(LocalReply(e.status, str(e), "protocol_error", DPE))
            return
        stream = self.streams[sid] = Stream(self, sid, head.grpc)
        ex = stream.ex = Exchange(stream, conn.env, head)
        ex.protocol = "grpc" if head.grpc else "h2"
        ex.upstream_h2 = True
        if conn.peer_identity:
            ex.peer_identity = conn.peer_identity
        if conn.mtls_note:
            ex.actions = (conn.mtls_note,)
        if event.stream_ended:  # HEADERS with END_STREAM: sent upstream the same way
            ex.request_done = True
        if head.deadline is not None:  # the client's grpc-timeout, as Istio's routes honour it (maxGrpcTimeout 0)
            ex.deadline(head.deadline, "")
        route = conn.route(head, head.extra.get(PEER_HEADER, b"") if head.extra is not None else b"")
        if type(route) is Route and route.dst_service in self.proxy.http1_services:
            ex.upstream_h2 = False  # declared http: the request goes on as HTTP/1.1 (proxy/upstream.py)
        ex.start(route)

    def _data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        n = event.flow_controlled_length
        if stream is None or stream.ex is None:  # answered already: dropped, the windows given back at once
            if n:
                try:
                    self.h2.acknowledge_received_data(n, event.stream_id)
                except (ProtocolError, StreamClosedError):
                    pass
            return
        stream.request_bytes += len(event.data)
        stream.unacked += n
        stream.ex.request_body(event.data)
        if not stream.paused and stream.unacked:
            stream.acknowledge()

    def _reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        stream.reset = True
        stream.out.clear()
        if self.loop.time() - stream.opened < PREMATURE_RESET_SECONDS and stream.ex is not None:
            self.premature_resets += 1
        ex = stream.ex
        if ex is not None:
            ex.abandon("downstream_reset", DR)
        self.forget(stream)
        if self.opened_streams >= PREMATURE_RESET_MIN_STREAMS and self.premature_resets * 2 > self.opened_streams:
            self.proxy.stats["downstream_cx_http2_premature_resets"] += 1
            self._close_with_error("too many streams reset right after opening (rapid reset)",
                                   ErrorCodes.ENHANCE_YOUR_CALM)

    def forget(self, stream: Stream) -> None:
        if stream.ex is None and (stream.ended or stream.reset) and self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self._close_if_done()

    # -- writes -----------------------------------------------------------------------------------------

    def dirty(self) -> None:
        """Frames are waiting in h2: written once this callback is over, with whatever else it adds."""
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    # -- the end -------------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful: GOAWAY with the last stream we take, what is in flight finishes, then the close."""
        if self.goaway_sent is None:
            self.closing = True
            self.goaway_sent = self.h2.highest_inbound_stream_id
            self.flush()
            if not self.transport.is_closing():
                self.transport.write(goaway(self.goaway_sent))
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.closing and not self.streams:
            self.flush()
            self.transport.close()

    def _close_with_error(self, why: str, code: ErrorCodes | None = None) -> None:
        """The client broke HTTP/2 (or abused it): GOAWAY with the code, everything in flight cut, the close."""
        self.closing = True
        if code is not None:
            self.h2.close_connection(code, additional_data=why.encode()[:256])
        self.flush()
        for stream in list(self.streams.values()):
            stream.reset = True
            if stream.ex is not None:
                stream.ex.abandon("protocol_error", DPE)
        self.streams.clear()
        self.transport.close()


_URLSAFE = bytes.maketrans(b"-_", b"+/")


def h2c_settings(value: bytes | None) -> bytes | None:
    """An HTTP2-Settings field's SETTINGS payload (base64url, padding optional); None when it is not one."""
    if value is None or len(value) > 1024:
        return None
    try:
        text = value.strip()  # two fields come joined by "," (field_value), which no base64url has: refused
        payload = base64.b64decode((text + b"=" * (-len(text) % 4)).translate(_URLSAFE), validate=True)
        SettingsFrame(0).parse_body(memoryview(payload))
    except (binascii.Error, ValueError, HyperframeError):
        return None
    return payload


class _BadHead:
    """The head of a request h2 let through but we refuse (CONNECT, extended CONNECT): nothing to route."""

    method, target, path, authority, version, keep_alive, upgrade = "", b"", "", "", "2", True, False
    traceparent = request_id = extra = host = None
    grpc, deadline, raw = False, None, b""


_BAD_HEAD: Any = _BadHead()

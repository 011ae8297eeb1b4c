"""One exchange on a downstream connection (`Request`), and the flow-control switch it uses.

A `Request` is fed request bytes by the downstream parser and response events by its
upstream connection; it re-frames each hop (chunked stays chunked, Content-Length as
sent, a close-delimited body for HTTP/1.0 clients), and owns the record's facts.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshlens.proxy.headers import Trace, forwardable, upgrade_fields

if TYPE_CHECKING:
    from meshlens.proxy.downstream import Downstream
    from meshlens.proxy.server import Route
    from meshlens.proxy.upstream import Upstream

__all__ = ["PIPELINE_BUFFER_BYTES", "Flow", "Request", "plain_response"]

# Request bytes held while no upstream is writable (connecting, or pipelined behind another
# request): one nginx client_body_buffer_size (16 KiB) times four; above it reading pauses.
PIPELINE_BUFFER_BYTES = 64 * 1024

_REASONS = {400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
            431: b"Request Header Fields Too Large", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 508: b"Loop Detected"}


def plain_response(status: int, text: str, close: bool) -> bytes:
    """A short plain-text response the proxy answers itself."""
    body = text.encode() + b"\n"
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, b"Error"), len(body), b"connection: close\r\n" if close else b"") + body)


class Flow:
    """Reading a transport is paused while any reason holds; pausing twice is harmless."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()


class Request:
    """One exchange on a downstream connection, from its first byte to its record."""

    __slots__ = ("conn", "t_wall", "t0", "method", "path", "authority", "version", "keep_alive", "chunked",
                 "head", "trace", "request_id", "route", "local", "error", "pending", "pending_bytes",
                 "upstream", "body_done", "request_sent", "status", "request_bytes", "response_bytes",
                 "response_started", "client_chunked", "close_after", "done", "upgrade")

    def __init__(self, conn: Downstream) -> None:
        self.conn = conn
        self.t_wall = time.time_ns()
        self.t0 = time.monotonic_ns()
        self.method = self.path = self.authority = ""
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.head = b""
        self.trace: Trace | None = None
        self.request_id = b""
        self.route: Route | None = None
        self.local: bytes | None = None  # a response the proxy gives itself (400, 431, 404, ...)
        self.error = ""
        self.pending: list[bytes] = []  # request bytes waiting for an upstream
        self.pending_bytes = 0
        self.upstream: Upstream | None = None
        self.body_done = False
        self.request_sent = False
        self.status = 0
        self.request_bytes = self.response_bytes = 0
        self.response_started = False
        self.client_chunked = False
        self.close_after = False
        self.done = False
        self.upgrade = False  # forwarded with its Upgrade field: a 101 turns the connection into a tunnel

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} status={self.status} done={self.done}>"

    # -- request bytes, from the downstream parser --------------------------------------------

    def write(self, data: bytes) -> None:
        if self.done:
            return  # answered already (e.g. 503): the rest of the body is read and dropped
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PIPELINE_BUFFER_BYTES:
                self.conn.flow.pause("buffer")

    def body(self, data: bytes) -> None:
        self.request_bytes += len(data)
        self.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def body_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.chunked:
            self.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")
        self.body_done = True
        if self.upstream is not None:
            self.request_sent = True

    def attach(self, up: Upstream) -> None:
        self.upstream = up
        up.start(self, head_only=self.method == "HEAD")
        assert up.transport is not None
        if self.conn.write_paused:
            up.transport.pause_reading()
        up.transport.write(self.head + b"".join(self.pending))
        self.pending.clear()
        self.pending_bytes = 0
        self.conn.flow.resume("buffer")
        self.request_sent = self.body_done

    # -- response, from the upstream connection -------------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], final: bool) -> None:
        conn = self.conn
        if not final:
            if status == 101 and self.upgrade:  # the switch: the tunnel starts after this head (Upstream)
                self.status = 101
                self.response_started = True
                conn.write(b"HTTP/1.1 101 %b\r\n%b%b\r\n" % (reason, forwardable(headers)[0], upgrade_fields(headers)))
                return
            if self.version == "1.1" and status != 101:  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
                conn.write(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, forwardable(headers)[0]))
            return
        self.status = status
        self.response_started = True
        fields, chunked, has_length = forwardable(headers)
        extra = b""
        if self.method == "HEAD" or status in (204, 304):
            pass  # no body whatever the fields say
        elif chunked:
            if self.version == "1.1":
                self.client_chunked = True
                extra = b"transfer-encoding: chunked\r\n"
            else:
                self.close_after = True  # HTTP/1.0 has no chunked: the body ends at close
        elif not has_length:
            self.close_after = True
        if self.close_after or not self.keep_alive or (conn.closing and len(conn.queue) <= 1 and conn.current is None):
            self.close_after = True
            extra += b"connection: close\r\n"
        conn.write(b"HTTP/1.1 %d %b\r\n%b%b\r\n" % (status, reason, fields, extra))

    def response_body(self, data: bytes) -> None:
        self.response_bytes += len(data)
        self.conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self.client_chunked else data)

    def response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.client_chunked:
            self.conn.write(b"0\r\n%b\r\n" % forwardable(trailers)[0])
        self.conn.finished(self)

    def switched(self, up: Upstream, rest: bytes) -> None:
        """The upstream switched protocols (101 sent on): `rest` is its first tunnel bytes."""
        self.upstream = None
        self.conn.upgraded(self, up, rest)

    def upstream_lost(self, protocol_error: bool = False) -> None:
        if self.done:
            return
        self.upstream = None
        if self.response_started:
            # mid-response: the client must see the response cut, so its connection is cut too
            self.error = "protocol_error" if protocol_error else "reset"
            self.conn.finished(self, abort=True)
        elif protocol_error:
            self.conn.answer(self, 502, "upstream sent a malformed response", "protocol_error")
        else:
            self.conn.answer(self, 503, "upstream reset the connection before responding", "reset")

"""Connections to upstreams: one response parser per connection, and a keep-alive pool.

An upstream connection carries one request at a time (no upstream pipelining, as
nginx and Envoy): the response's head, body and end are handed to the downstream
connection that owns the request. Responses to HEAD end with their head, which
llhttp cannot know, so their head is cut out here before llhttp sees it.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import MAX_HEADER_BYTES, MAX_HEADER_COUNT

if TYPE_CHECKING:
    from meshlens.proxy.request import Request

__all__ = ["CONNECT_TIMEOUT", "MAX_IDLE_PER_UPSTREAM", "POOL_IDLE_TIMEOUT", "Pool", "Upstream"]

# Envoy's cluster connect_timeout default is 5 s (nginx proxy_connect_timeout 60 s).
CONNECT_TIMEOUT = 5.0
# Idle kept-alive connections per upstream address: nginx's `keepalive 32` in its docs' example.
MAX_IDLE_PER_UPSTREAM = 32
# Close pooled connections idle this long: below the 60-75 s servers use (nginx, aiohttp),
# so the proxy closes first and never writes into a connection the upstream is closing.
POOL_IDLE_TIMEOUT = 30.0


class Upstream(asyncio.Protocol):
    """One connection to an upstream address; also its httptools callback object."""

    def __init__(self, pool: Pool, addr: tuple[str, int]) -> None:
        # per connection
        self.pool, self.addr = pool, addr
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.write_paused = False
        # per request
        self.request: Request | None = None
        self.head_only = False  # the request was HEAD: the response ends with its head
        self.head_buf = bytearray()
        self.in_head = False
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.framed = False
        self.final = False  # the head seen was a final (non-1xx) response
        self.keep_alive = True

    def __repr__(self) -> str:
        return f"<Upstream {self.addr} busy={self.request is not None} closed={self.closed}>"

    # -- asyncio --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        req, self.request = self.request, None
        if req is None:
            return
        if self.final and not self.framed and exc is None and not self.in_head:
            req.response_end(self.trailers)  # RFC 9112 6.3: a body without length ends at close
        else:
            req.upstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.request is not None:
            self.request.conn.flow.pause("upstream")

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.request is not None:
            self.request.conn.flow.resume("upstream")

    def data_received(self, data: bytes) -> None:
        if self.request is None:
            self.close()  # bytes nobody asked for: the connection cannot be reused
            return
        conn = self.request.conn
        conn.cork()  # head, body and end of a small response leave in one send
        try:
            if self.head_only:
                self._feed_head_only(data)
            else:
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            req, self.request = self.request, None
            if req is not None and req.upgrade and req.status == 101:
                # this connection now belongs to the tunnel: out of the pool's sight for good
                self.closed = True
                self.pool.forget(self)
                conn.uncork()  # the 101 head first, then the tunnel's bytes
                req.switched(self, data[e.args[0]:])
            else:  # a 101 nobody asked for
                self.close()
                if req is not None:
                    req.upstream_lost(protocol_error=True)
        except (httptools.HttpParserError, PeerError):
            req, self.request = self.request, None
            self.close()
            if req is not None:
                req.upstream_lost(protocol_error=True)
        finally:
            conn.uncork()

    def _feed_head_only(self, data: bytes) -> None:
        buf = self.head_buf
        buf += data
        while self.request is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise PeerError("response head too large", status=502)
                return
            head = bytes(buf[:end + 4])
            del buf[:end + 4]
            self.parser = httptools.HttpResponseParser(self)
            try:
                self.parser.feed_data(head)
            except httptools.HttpParserUpgrade:
                pass
            if self.final and self.request is not None:
                self.parser = httptools.HttpResponseParser(self)
                if buf:  # body bytes after a HEAD response: this upstream cannot be trusted with another
                    self.keep_alive = False
                    buf.clear()
                self.on_message_complete()  # RFC 9112 6.3: a response to HEAD has no body

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.headers = []
        self.trailers = []
        self.head_bytes = 0
        self.framed = False
        self.final = False

    def on_status(self, status: bytes) -> None:
        self.reason = status
        self.head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEADER_BYTES:
            raise PeerError("response head too large", status=502)
        if self.in_head:
            self.headers.append((name, value))
            if len(self.headers) > MAX_HEADER_COUNT:
                raise PeerError("too many response header fields", status=502)
            n = name.lower()
            if n == b"content-length" or (n == b"transfer-encoding" and b"chunked" in value.lower()):
                self.framed = True
        else:
            self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        status = self.parser.get_status_code()
        self.final = not (100 <= status < 200)
        self.keep_alive = self.parser.should_keep_alive()
        if status in (204, 304):
            self.framed = True  # RFC 9112 6.3: never a body
        req = self.request
        assert req is not None
        req.response_head(status, self.reason, self.headers, self.final)

    def on_body(self, body: bytes) -> None:
        if self.request is not None:
            self.request.response_body(body)

    def on_message_complete(self) -> None:
        if not self.final:
            return  # a 1xx: the final response follows on this connection
        req, self.request = self.request, None
        keep = self.keep_alive
        if req is not None:
            req.response_end(self.trailers)
            if keep and req.request_sent:
                self.pool.release(self)
                return
        self.close()

    # -- use -------------------------------------------------------------------------------

    def start(self, req: Request, head_only: bool) -> None:
        self.request = req
        self.head_only = head_only
        self.head_buf.clear()
        self.final = False
        self.parser = httptools.HttpResponseParser(self)  # a fresh parser per exchange: no leftover state
        if self.write_paused:
            req.conn.flow.pause("upstream")

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.request = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """Idle upstream connections by address, most recently used first (per process)."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.idle: dict[tuple[str, int], deque[Upstream]] = {}
        self.stats = stats
        self.active = 0

    def take(self, addr: tuple[str, int]) -> Upstream | None:
        idle = self.idle.get(addr)
        now = time.monotonic()
        while idle:
            up = idle.pop()
            if not up.closed and now - up.idle_since < POOL_IDLE_TIMEOUT:
                self.stats["upstream_cx_reused"] += 1
                return up
            up.close()
        return None

    async def connect(self, addr: tuple[str, int]) -> Upstream:
        loop = asyncio.get_running_loop()
        self.stats["upstream_cx_total"] += 1
        _, up = await asyncio.wait_for(loop.create_connection(lambda: Upstream(self, addr), addr[0], addr[1]),
                                       CONNECT_TIMEOUT)
        return up

    def release(self, up: Upstream) -> None:
        idle = self.idle.setdefault(up.addr, deque())
        if len(idle) >= MAX_IDLE_PER_UPSTREAM:
            up.close()
            return
        up.idle_since = time.monotonic()
        if up.transport is not None:
            up.transport.resume_reading()
        idle.append(up)

    def forget(self, up: Upstream) -> None:
        idle = self.idle.get(up.addr)
        if idle and up in idle:
            idle.remove(up)

    def close(self) -> None:
        for idle in self.idle.values():
            for up in list(idle):
                up.close()
        self.idle.clear()

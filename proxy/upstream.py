"""The upstream-facing shell: one `Upstream` per connection to an upstream endpoint.

Thin by design: it writes what its exchange sends, feeds the answer to the codec
(`ResponseReader`) and hands heads, body bytes and ends to the exchange that owns it.
It carries one request at a time (no upstream pipelining, as nginx and Envoy); between
exchanges it waits in the pool (proxy/pool.py). Connections are opened only by
proxy/connect.py.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import ResponseHead, ResponseReader

if TYPE_CHECKING:
    from meshlens.proxy.exchange import Exchange
    from meshlens.proxy.pool import Pool

__all__ = ["Upstream"]


class Upstream(asyncio.Protocol):
    """One connection to an upstream address; also the consumer of its ResponseReader."""

    def __init__(self, pool: Pool, addr: tuple[str, int]) -> None:
        # per connection
        self.pool, self.addr = pool, addr
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader(self)
        self.closed = False
        self.idle_since = 0.0
        self.write_paused = False
        # per exchange
        self.exchange: Exchange | None = None

    def __repr__(self) -> str:
        return f"<Upstream {self.addr} busy={self.exchange is not None} closed={self.closed}>"

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex = self.exchange
        if ex is None:
            return
        try:
            self.reader.feed_eof()  # ends a body delimited by close (RFC 9112 6.3), through the callbacks
        finally:
            if self.exchange is ex:
                self.exchange = None
                ex.upstream_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.conn.pause_reading("upstream")

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.conn.resume_reading("upstream")

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: the connection cannot be reused
            return
        conn = ex.conn
        conn.corked = True  # head, body and end of a small response leave in one send (Downstream.cork)
        try:
            self.reader.feed(data)
        except PeerError:
            ex = self.exchange
            self.exchange = None
            self.close()
            if ex is not None:
                ex.upstream_lost(protocol_error=True)
        finally:
            conn.uncork()

    # -- the codec's callbacks ----------------------------------------------------------------

    def on_response(self, head: ResponseHead) -> None:
        ex = self.exchange
        if ex is None:
            raise PeerError("a response nobody asked for", status=502)
        ex.response_head(head)

    def on_response_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.response_body(data)

    def on_response_end(self, head: ResponseHead, body_bytes: int) -> None:
        ex = self.exchange
        if ex is not None and not head.upgraded:
            self.exchange = None
            ex.response_end(head, body_bytes)

    def on_tunnel(self, rest: bytes) -> None:
        ex, self.exchange = self.exchange, None
        self.closed = True  # this connection belongs to the tunnel now: out of the pool's sight
        self.pool.forget(self)
        if ex is not None:
            ex.upgraded(self, rest)

    # -- the exchange's side ------------------------------------------------------------------

    def attach(self, ex: Exchange) -> None:
        self.exchange = ex
        reader = self.reader
        reader.methods.append(ex.method)  # ResponseReader.expect, inline: once per request
        reader._body_cb = ex.response_body  # body bytes straight to the exchange, not through a method here
        if self.write_paused:
            ex.conn.pause_reading("upstream")
        if ex.conn.write_paused and self.transport is not None:
            self.transport.pause_reading()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def release(self) -> None:
        """Back to the pool: idle from now."""
        self.exchange = None
        self.idle_since = time.monotonic()
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.exchange = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.exchange = None
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

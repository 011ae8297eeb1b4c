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
from meshlens.proxy.h2_fields import H2RequestHead, h1_request_head
from meshlens.proxy.headers import request_head

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
        self.requests = 0
        """Requests it carried (a DestinationRule's maxRequestsPerConnection closes it at the limit)."""
        self.peer_identity = ""
        """The server's verified SPIFFE id when this connection is mTLS (proxy/mtls.py), else ''."""
        self.idle_timeout: float | None = None
        """Its destination's idleTimeout (enforced), else None: the pool's own."""
        self.chunking = False
        """This request's body is framed here (an HTTP/2 client's without content-length): chunks, then the last."""
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
                self._detach()
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
            self.close()
            if ex is not None:
                ex.upstream_lost(protocol_error=True)
        finally:
            if conn.wbuf:
                conn.uncork()
            else:
                conn.corked = False

    # -- the codec's callbacks ----------------------------------------------------------------

    # While an exchange is attached, the reader calls its response_head, response_body and
    # response_end directly (bound in `attach`: two calls a response fewer); these are the
    # callbacks of a connection with none attached.

    def on_response(self, head: ResponseHead) -> None:
        raise PeerError("a response nobody asked for", status=502)

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self, head: ResponseHead, body_bytes: int) -> None:
        pass

    def on_tunnel(self, rest: bytes) -> None:
        ex = self.exchange
        self._detach()
        self.closed = True  # this connection belongs to the tunnel now: out of the pool's sight
        self.pool.forget(self)
        if ex is not None:
            ex.upgraded(self, rest)

    # -- the exchange's side ------------------------------------------------------------------

    def attach(self, ex: Exchange) -> None:
        self.exchange = ex
        self.requests += 1
        reader = self.reader
        reader.methods.append(ex.method)  # ResponseReader.expect, inline: once per request
        reader._on_head, reader._body_cb, reader._on_end = ex.response_head, ex.response_body, ex.response_end
        if self.write_paused:
            ex.conn.pause_reading("upstream")
        if ex.conn.write_paused and self.transport is not None:
            self.transport.pause_reading()

    def send_request(self, ex: Exchange, body: list[bytes] | tuple[()] | None) -> None:
        """The exchange's head, our fields spliced in, and the body bytes it holds (as the client framed them)."""
        head = ex.head
        if type(head) is H2RequestHead:  # an HTTP/2 client, a destination declared http: the head as HTTP/1.1
            length = sum(map(len, body)) if ex.request_done and body else 0 if ex.request_done else None
            out, self.chunking = h1_request_head(head, ex.trace, ex.new_id, ex.env.peer_field, length)
            self.transport_write(out)
            for piece in body or ():
                self.send(piece)
            return
        out = request_head(head, ex.trace, ex.new_id, ex.env.peer_field)
        self.send(out + b"".join(body) if body else out)

    def transport_write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def end_request(self) -> None:
        """The request is complete: a body framed here gets its last chunk (HTTP/1.1 clients frame their own)."""
        if self.chunking:
            self.chunking = False
            self.transport_write(b"0\r\n\r\n")

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunking and data else data)

    def pause_reading(self) -> None:
        """The client cannot take more of the response now."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _detach(self) -> None:
        self.exchange = None
        reader = self.reader
        reader._on_head, reader._body_cb, reader._on_end = self.on_response, self.on_response_body, self.on_response_end

    def release(self) -> None:
        """Back to the pool: idle from now."""
        self._detach()
        self.idle_since = time.monotonic()
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self._detach()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self._detach()
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

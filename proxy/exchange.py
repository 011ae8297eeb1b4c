"""One request and its response through the sidecar: the exchange and the order things happen in.

The exchange is the one place that knows the order of a request's life: route, the
policy chain at the request head, an endpoint from the cluster, an upstream connection
from the pool or `connect`, the head sent (fields spliced in), the body streamed (and a
bounded copy kept for a retry), the response head through the chain, the response
streamed back, the end. Each attempt is one try at one endpoint. Time comes from the
`env` passed in (`now_ns`, `call_later`), never from the clock directly: transcript
tests drive an exchange with a fake environment and clock (tests/proxy/test_exchange.py).

The shells feed it: `Downstream` (the client's bytes, parsed) or one HTTP/2 stream's
`Stream` (proxy/h2_downstream.py) calls `start`, `request_body`, `request_end`; `Upstream`
or an HTTP/2 stream's `UpstreamStream` (proxy/h2_upstream.py) calls `response_head`,
`response_body`, `response_end`, `upstream_lost`, `upgraded`. The exchange knows no wire
format: the upstream writes the request (`send_request`, `send`, `end_request`), the
client's shell the response (`write_head`, `write`, `write_local`), and it tells the
client's shell when it is done.
"""
from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, Any, Callable

from meshlens.proxy.chain import Decision, Kind
from meshlens.proxy.connect import (
    UPSTREAM_PROTOCOL_ERROR,
    UPSTREAM_REFUSED_STREAM,
    UPSTREAM_RESET,
    UC,
    UT,
    URX,
    LocalReply,
)
from meshlens.proxy.headers import new_request_id, trace_for

if TYPE_CHECKING:
    from meshlens.protocols.http1 import RequestHead, ResponseHead
    from meshlens.proxy.router import Route

__all__ = ["MAX_ATTEMPTS", "MAX_REPLAY_BYTES", "PIPELINE_BUFFER_BYTES", "Env", "Exchange", "State", "plain_response"]

# Request body bytes kept for a retry: Linkerd retries requests with bodies up to 64 KiB
# and never larger ones; a request beyond this is never retried.
MAX_REPLAY_BYTES = 64 * 1024
# Tries of one request, whatever asks for them: the first, a policy's retries, and the one
# free retry of a request a pooled connection lost before the upstream read it.
MAX_ATTEMPTS = 5
# Request body bytes held while no upstream connection is attached yet (connecting,
# or a later pipelined request waiting its turn); past it the client is not read.
PIPELINE_BUFFER_BYTES = 64 * 1024

_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
            408: b"Request Timeout", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 508: b"Loop Detected"}


def plain_response(status: int, text: str, close: bool, headers: bytes = b"") -> bytes:
    """A local reply: `headers` are complete field lines (each ending in CRLF) added to the head."""
    body = text.encode("utf-8", "replace") + b"\n"
    return b"HTTP/1.1 %d %b\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%b%b\r\n%b" % (
        status, _REASONS.get(status, b"Error"), len(body), headers, b"connection: close\r\n" if close else b"",
        body)


class Env:
    """What an exchange needs from its process, one per listener: the policy chain, the pool,
    connecting, balancing again for a retry, the field it adds, and the clock. Tests pass a fake."""

    __slots__ = ("pool", "peer_field", "upstream_timeout", "dial", "rebalance", "cluster", "mirror", "h2_pool")

    now_ns = staticmethod(time.monotonic_ns)
    wall_ns = staticmethod(time.time_ns)

    def __init__(self, pool: Any, peer_field: bytes, upstream_timeout: float | None,
                 dial: Callable[[tuple[str, int], Exchange], None], rebalance: Callable[[Any, tuple[Any, ...]], Any],
                 cluster: Callable[[str], Any], mirror: Callable[[Exchange], bool] | None = None,
                 h2_pool: Any = None) -> None:
        self.pool = pool
        """Idle HTTP/1.1 upstream connections (proxy/pool.py)."""
        self.h2_pool = h2_pool
        """HTTP/2 upstream connections, each carrying many exchanges (proxy/h2_upstream.py)."""
        self.peer_field = peer_field
        """Added to every request sent upstream (outbound: x-meshlens-peer), else b''."""
        self.upstream_timeout = upstream_timeout
        """Route timeout: the whole response within this many seconds of the request, else 504 UT. None: off."""
        self.dial = dial
        """Open a connection to an address for an exchange (HTTP/2 when `upstream_h2`): calls back `connected` or
        `connect_failed`."""
        self.rebalance = rebalance
        """The route for another attempt, avoiding the endpoints tried (the cluster picks again), or a LocalReply."""
        self.cluster = cluster
        """A destination service's cluster (its endpoints, for outlier detection), or None."""
        self.mirror = mirror
        """Send a copy of an exchange's complete request to its `mirror_to` (proxy/mirror.py); False if not sent."""

    @staticmethod
    def call_later(delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, fn)


class State(enum.Enum):
    """Where the exchange is."""

    __hash__ = object.__hash__

    QUEUED = "queued"  # a pipelined request waiting for the ones before it
    CONNECTING = "connecting"  # an upstream connection is being opened for this attempt
    SENT = "sent"  # the head went upstream; no response head forwarded yet
    RESPONDING = "responding"  # a response head went to the client: no retry, no local reply now
    TUNNEL = "tunnel"  # upgraded: the connection carries the tunnel (recorded when it ends)
    DONE = "done"


# Rules: QUEUED -> CONNECTING | SENT | DONE (a local reply); CONNECTING -> SENT | DONE | CONNECTING (a retry);
# SENT -> CONNECTING | SENT (a retry) | RESPONDING | TUNNEL | DONE; RESPONDING -> DONE | TUNNEL;
# TUNNEL -> DONE. Nothing leaves DONE.
_STATES: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.CONNECTING, State.SENT, State.DONE}),
    State.CONNECTING: frozenset({State.CONNECTING, State.SENT, State.DONE}),
    State.SENT: frozenset({State.CONNECTING, State.SENT, State.RESPONDING, State.TUNNEL, State.DONE}),
    State.RESPONDING: frozenset({State.DONE, State.TUNNEL}),
    State.TUNNEL: frozenset({State.DONE}),
    State.DONE: frozenset(),
}
_QUEUED, _CONNECTING, _SENT, _RESPONDING, _TUNNEL, _DONE = (
    State.QUEUED, State.CONNECTING, State.SENT, State.RESPONDING, State.TUNNEL, State.DONE)


class Exchange:
    """One request/response pair, with its attempts. Also what the recorder reads.

    Attributes not set on an instance read their class default (below): an exchange is built
    once per request, and each store saved there is saved on every request."""

    # where it goes, and the tries
    route: Route | None = None
    state = _QUEUED
    upstream: Any = None
    attempt = 0
    reused = False
    lost_retried = False
    timer: Any = None
    # request body
    pending: list[bytes] | None = None
    """Body bytes that came while no upstream was attached (queued, connecting)."""
    pending_bytes = 0
    replay: list[bytes] | tuple[()] | None = ()
    """A copy of the body for a retry: () until some arrives, None once it outgrew MAX_REPLAY_BYTES."""
    replay_bytes = 0
    request_done = False
    request_bytes = 0
    # response and outcome
    status = 0
    response_bytes = 0
    local: bytes | None = None
    error = ""
    flags = ""
    actions: tuple[str, ...] = ()
    refused: LocalReply | None = None
    """Set when the client broke HTTP in this request (or timed out): answered with it at its turn."""
    # policies (proxy/policies.py): only exchanges to a destination in dry-run or enforce set these
    chain: Any = None
    """The destination's policy chain; None in observe mode (no hook runs, not even a test)."""
    chain_at = 0
    """Where the chain's request hooks go on after a DELAY or WAIT."""
    delayed = False
    waiting = False
    """Held by a policy (WAIT: a pending request) until it calls `resume`."""
    slot = 0
    """How the destination's pool limits count it (proxy/limits.py)."""
    retrying = False
    breaker: Any = None
    per_connection = 0
    """Requests an upstream connection carries at most (maxRequestsPerConnection); 0: no limit."""
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    """The upstream connection's idle timeout once released (a DestinationRule's idleTimeout)."""
    per_try: float | None = None
    """Each attempt's response head within this many seconds, else the attempt fails 504 UT."""
    try_timer: Any = None
    wait_timer: Any = None
    tried: tuple[Any, ...] = ()
    """Endpoints tried: a retry goes elsewhere when it can."""
    peer_identity = ""
    """The verified SPIFFE id at the other end of mTLS: inbound the client's, outbound the server's ('' for
    plaintext); what authorization decides on and the record's peer_identity."""
    mirror_to: tuple[str, str] | None = None
    """(service, subset) a copy of the request goes to once it is complete (a rule's mirror, enforced)."""
    # HTTP/2 and gRPC (proxy/h2_downstream.py, proxy/h2_upstream.py)
    protocol = "http/1.1"
    """What the record calls it: http/1.1, h2 (an HTTP/2 stream) or grpc."""
    upstream_h2 = False
    """The upstream speaks HTTP/2: the client did, or the destination is declared grpc or http2."""
    grpc_status = -1
    """The response's grpc-status (from its trailers, or a trailers-only head; our own reply's); -1: none."""
    grpc_message = ""
    trailers: Any = None
    """An HTTP/2 response's trailers, for a client's stream to end with."""

    def __init__(self, conn: Any, env: Any, head: RequestHead) -> None:
        self.conn = conn
        self.env = env
        self.head = head
        self.t_wall = env.wall_ns()
        self.t0 = env.now_ns()
        self.method, self.path, self.authority = head.method, head.path, head.authority
        self.trace = trace_for(head.traceparent)
        request_id = head.request_id
        if request_id is None:
            self.new_id = self.request_id = new_request_id()
        else:
            self.new_id, self.request_id = None, request_id
        self.close_after = not head.keep_alive

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.path} {self.state.name} status={self.status} attempt={self.attempt}>"

    def _move(self, new: State) -> None:
        if new not in _STATES[self.state]:
            raise RuntimeError(f"Exchange: no transition {self.state.name} -> {new.name}")
        self.state = new

    # -- the request --------------------------------------------------------------------------

    def start(self, route: Route | LocalReply) -> None:
        """Its turn came (first in its connection's queue), routed or answered by the router."""
        if isinstance(route, LocalReply):
            self.reply(route)
            return
        self.route = route
        dest = route.dest
        if dest is not None:
            if route.note:
                self.actions += (route.note,)
            chain = self.chain = dest.chain
            d = chain.on_request(self)
            if d is not None and self._decided(d):
                return
        self._try(route)

    def resume(self) -> None:
        """A policy let the exchange go on (its pending turn came, a delay passed): the next policies, then upstream."""
        self.wait_timer = None
        self.waiting = False
        if self.state is not _QUEUED or self.route is None:
            return  # ended meanwhile (the client left)
        d = self.chain.on_request(self, self.chain_at)
        if d is not None and self._decided(d):
            return
        self._try(self.route)

    def deadline(self, seconds: float, action: str) -> None:
        """A policy's timeout for the whole response, from now: when it passes, 504 UT and `action` recorded."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.env.call_later(seconds, lambda: self._timed_out(action))

    def request_body(self, data: bytes) -> None:
        """Body bytes as framed by the client."""
        if self.state is _DONE:
            return  # answered already (a local reply, a 413 from upstream): read and dropped
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes > MAX_REPLAY_BYTES:
                self.replay = None  # never retried now
            elif replay:
                replay.append(data)  # type: ignore[union-attr]
            else:
                self.replay = [data]
        up = self.upstream
        if up is not None and self.state is not _CONNECTING:
            up.send(data)
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes > PIPELINE_BUFFER_BYTES:
                self.conn.pause_reading("buffer")

    def request_end(self, body_bytes: int) -> None:
        """The request is complete (Downstream.on_request_end does this inline: keep the two alike)."""
        self.request_done = True
        self.request_bytes = body_bytes
        if self.upstream is not None and self.state is _SENT:
            self.upstream.end_request()  # HTTP/2 ends with END_STREAM, a body framed by us with its last chunk
        if self.mirror_to is not None:
            self.send_mirror()

    def send_mirror(self) -> None:
        """The request is complete: its copy goes to the mirror (not when its body outgrew the replay buffer)."""
        if self.replay is not None and self.env.mirror is not None and self.env.mirror(self):
            self.actions += ("mirrored",)
        self.mirror_to = None

    # -- attempts -------------------------------------------------------------------------------

    def _try(self, route: Route, fresh: bool = False) -> None:
        """One attempt at `route`'s endpoint: a pooled connection (unless `fresh`), else a new one."""
        self.attempt += 1
        up = None if fresh else (self.env.h2_pool if self.upstream_h2 else self.env.pool).take(route.addr)
        if up is not None:
            self.reused = True
            self._send(up)
        else:
            self.reused = False
            self._move(_CONNECTING)
            self.env.dial(route.addr, self)

    def connected(self, up: Any) -> None:
        """`env.dial` opened a connection for this attempt."""
        if self.state is not _CONNECTING or self.route is None or up.addr != self.route.addr:
            # the exchange ended or moved on while connecting (client left, timeout)
            (self.env.h2_pool if self.upstream_h2 else self.env.pool).release(up)
            return
        self._send(up)

    def connect_failed(self, reply: LocalReply) -> None:
        if self.state is _CONNECTING:
            self._failed(reply)

    def _send(self, up: Any) -> None:
        self.upstream = up
        up.attach(self)
        if up.peer_identity:
            self.peer_identity = up.peer_identity
        if self.state is not _QUEUED:  # the first attempt's QUEUED -> SENT is always allowed (hot path)
            self._move(_SENT)
        self.state = _SENT
        # a first attempt sends what came while it was queued or connecting; a retry, all of it
        up.send_request(self, self.pending if self.attempt == 1 else self.replay)
        if self.pending:
            self.pending = None
            self.pending_bytes = 0
            self.conn.resume_reading("buffer")
        timeout = self.env.upstream_timeout
        if timeout and self.timer is None:
            self.timer = self.env.call_later(timeout, self._timed_out)
        if self.per_try:
            if self.try_timer is not None:
                self.try_timer.cancel()
            self.try_timer = self.env.call_later(self.per_try, self._try_timed_out)

    def _retry(self, delay: float = 0.0) -> str:
        """Another attempt after `delay` s, at the endpoint the cluster picks then: '' when it is made, else why
        not ('limit': MAX_ATTEMPTS were made; 'body': the body outgrew the replay buffer)."""
        if self.attempt >= MAX_ATTEMPTS:
            return "limit"
        if self.replay is None:
            return "body"
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()  # what it would still send can no longer be read as this exchange's
        self._cancel_try_timer()
        if delay > 0:
            self.wait_timer = self.env.call_later(delay, self._retry_now)
        else:
            self._retry_now()
        return ""

    def _retry_now(self) -> None:
        self.wait_timer = None
        if self.state is _DONE or self.state is _RESPONDING or self.state is _TUNNEL:
            return
        route = self.route
        assert route is not None
        if route.endpoint is not None:
            self.tried += (route.endpoint,)
        again = self.env.rebalance(route, self.tried)
        if isinstance(again, LocalReply):
            self.reply(again)
            return
        self.route = again
        self._try(again)

    # -- the response ---------------------------------------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        if self.state is not _SENT and self.state is not _RESPONDING:
            return
        if head.interim:
            if self.head.version == "1.1":  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
                self.conn.write(head.raw)  # only an HTTP/1.1 upstream passes 1xx on (proxy/h2_upstream.py)
            return
        if self.try_timer is not None:
            self._cancel_try_timer()
        chain = self.chain
        if chain is not None and self.state is _SENT:
            d = chain.on_response(self, head)
            if d is not None and self._decided(d):
                return
        self.state = _RESPONDING  # from SENT, checked above (hot path)
        self.status = head.status
        if not head.keep_alive and head.content_length < 0 and not head.chunked and head.method != "HEAD" \
                and head.status not in (204, 304):
            self.close_after = True  # the body ends when the upstream closes: so must the client's connection
        close = (self.close_after or self.conn.closing) and head.status != 101
        self.conn.write_head(head, close)

    def response_body(self, data: bytes) -> None:
        if self.state is _RESPONDING:
            self.conn.write(data)

    def response_end(self, head: ResponseHead, body_bytes: int) -> None:
        if self.state is not _RESPONDING or head.upgraded:  # an upgrade's end is its tunnel's (`upgraded`)
            return
        self.response_bytes = body_bytes
        up, self.upstream = self.upstream, None
        if up is not None:
            if head.keep_alive and self.head.keep_alive and self.request_done and (
                    not self.per_connection or up.requests < self.per_connection):
                if self.idle_timeout is not None:
                    up.idle_timeout = self.idle_timeout
                self.env.pool.release(up)
            else:
                up.close()
        self._finish()

    def tunnel_connecting(self, route: Route) -> None:
        """CONNECT to the outbound listener: proxy/passthrough.py connects the tunnel itself."""
        self.route = route
        self._move(_CONNECTING)

    def tunnel_opened(self) -> None:
        self.status = 200
        self._move(_SENT)
        self._move(_TUNNEL)

    def upgraded(self, up: Any, rest: bytes) -> None:
        """The upstream switched protocols (its 101 head is written): the connection becomes a tunnel."""
        self.upstream = None
        self._move(_TUNNEL)
        self._cancel_timer()
        self.conn.upgraded(self, up, rest)

    def tunnel_ended(self, request_bytes: int, response_bytes: int, error: str) -> None:
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        self.error = self.error or error
        self._move(_DONE)

    # -- failures -------------------------------------------------------------------------------

    def upstream_lost(self, protocol_error: bool = False, refused: bool = False, goaway: bool = False) -> None:
        """The upstream connection closed or sent what is not HTTP, before the response ended; `refused`: an
        HTTP/2 server refused the stream unread (REFUSED_STREAM, or above its GOAWAY: `goaway`)."""
        state = self.state
        if state is _DONE or state is _TUNNEL:
            return
        self.upstream = None
        if state is _RESPONDING:
            # mid-response: the client must see the response cut, so its connection is cut too
            self.error = "protocol_error" if protocol_error else "reset"
            self.flags = "UPE" if protocol_error else UC
            self.close_after = True
            self.conn.abort()
            self._finish()
            return
        if (not protocol_error and (goaway or self.reused and not self.upstream_h2) and not self.lost_retried
                and self.replay is not None and self.route is not None and self.attempt < MAX_ATTEMPTS):
            # Envoy's rule: a pooled connection the upstream closed before answering is retried
            # once on a fresh connection, whatever the retry policy says; so is an HTTP/2 stream a GOAWAY says
            # was never processed (RFC 9113 8.7), even on a new connection (a server closing on a burst). A
            # REFUSED_STREAM is the server's choice: retryOn refused-stream decides.
            self.lost_retried = True
            self._try(self.route, fresh=True)
            return
        self._failed(UPSTREAM_REFUSED_STREAM if refused else UPSTREAM_PROTOCOL_ERROR if protocol_error else UPSTREAM_RESET)

    def _timed_out(self, action: str = "") -> None:
        """The whole response's time is up (the route's timeout): never retried, as in Envoy."""
        self.timer = None
        if self.state is _DONE or self.state is _TUNNEL:
            return
        if action:
            self.actions += (action,)
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        if self.state is _RESPONDING:
            self.error, self.flags, self.close_after = "timeout", UT, True
            self.conn.abort()
            self._finish()
            return
        self.reply(LocalReply(504, "upstream request timeout", "timeout", UT))

    def _try_timed_out(self) -> None:
        """This attempt's response head did not come within perTryTimeout: the attempt fails (and may be retried)."""
        self.try_timer = None
        if self.state is not _SENT and self.state is not _CONNECTING:
            return
        if self.wait_timer is not None:
            return  # between attempts (backing off)
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        self.actions += ("timed_out",)  # per_try is set only by an enforced Timeout policy
        self._failed(LocalReply(504, "upstream request timeout (per try)", "timeout", UT))

    def _failed(self, reply: LocalReply) -> None:
        """An attempt failed before any response reached the client: the chain may retry."""
        chain = self.chain
        if chain is not None:
            d = chain.on_error(self, reply)
            if d is not None and self._decided(d):
                return
        self.reply(reply)

    def _decided(self, d: Decision) -> bool:
        """Carry out an enforced decision; False when it cannot be (the exchange goes on as if none)."""
        kind = d.kind
        if kind is Kind.RETRY:
            why_not = self._retry(d.delay)
            if not why_not:
                return True
            if why_not == "limit":
                self.flags = URX  # Envoy's: the retry limit was reached
            return False
        if kind is Kind.DELAY:
            self.wait_timer = self.env.call_later(d.delay, self.resume)
            return True
        if kind is Kind.WAIT:
            self.waiting = True  # the policy calls `resume` when its turn comes
            return True
        assert d.reply is not None
        if self.state is _RESPONDING:
            self.error, self.flags, self.close_after = d.reply.error, d.reply.flags, True
            self.conn.abort()
            self._finish()
        else:
            up, self.upstream = self.upstream, None
            if up is not None:
                up.abort()
            self.reply(d.reply)
        return True

    def reply(self, r: LocalReply) -> None:
        """Answer the client ourselves (nothing of an upstream's response was sent)."""
        if self.state is _DONE:
            return
        # 400/408/431: the request stream cannot be trusted further; 508: the connection loops
        close = self.close_after or self.conn.closing or r.status in (400, 408, 431, 508)
        self.close_after = close
        self.status, self.error = r.status, r.error
        if r.flags:
            self.flags = r.flags if not self.flags else self.flags + "," + r.flags
        self.local = self.conn.write_local(r, close)
        self._finish()

    def cut(self, reply: LocalReply) -> None:
        """The client broke HTTP inside this request before any response went back: the upstream
        (if any) is cut and the client hears `reply`."""
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        self.reply(reply)

    def abandon(self, error: str, flags: str) -> None:
        """The client went away: whatever is upstream is cut, and the exchange recorded as it stands."""
        if self.state is _DONE:
            return
        if not self.error:
            self.error, self.flags = error, flags
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        self._cancel_timer()
        self.state = _DONE
        if self.chain is not None:
            self._ended()
        self.conn.exchange_done(self)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _cancel_try_timer(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _ended(self) -> None:
        """The policies' end of an exchange: their timers stop, the chain's end hooks run."""
        if self.try_timer is not None:
            self._cancel_try_timer()
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
        self.chain.end(self)

    def _finish(self) -> None:
        if self.timer is not None:
            self._cancel_timer()
        self.state = _DONE  # every state but DONE may end; reply() and the others return early on DONE
        if self.chain is not None:
            self._ended()
        self.conn.exchange_done(self)

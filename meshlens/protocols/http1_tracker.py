"""HTTP/1.1 seen from the wire (the tap): the two readers of `http1`, paired into `Exchange` records.

A thin observer over a `RequestReader` and a `ResponseReader`: it pairs each response
with its request, stamps times (every entry point takes the time, ns, of its bytes),
follows an accepted upgrade into a tunnel, and recovers from what a capture loses
(gaps, a capture that begins inside a connection), marking the exchanges it hit
incomplete. No I/O and no clock.
"""
from __future__ import annotations

import enum
from collections import deque

from meshlens.protocols.errors import LocalError, PeerError
from meshlens.protocols.exchange import Event, Exchange, TunnelClosed, TunnelOpened
from meshlens.protocols.http1 import MAX_PENDING_EXCHANGES, Phase, RequestHead, RequestReader, ResponseHead, ResponseReader
from meshlens.protocols.trace_context import parse_traceparent

__all__ = ["Direction", "Http1Tracker", "State", "parse_traceparent"]

Direction = str  # "request" or "response"
_HEAD, _IDLE, _UPGRADE_WAIT = Phase.HEAD, Phase.IDLE, Phase.UPGRADE_WAIT


class State(enum.Enum):
    """The connection."""

    __hash__ = object.__hash__

    HTTP = "http"
    TUNNEL = "tunnel"
    CLOSED = "closed"


# Rules: HTTP -> TUNNEL after a 101 or a 2xx to CONNECT; HTTP or TUNNEL -> CLOSED on
# response EOF or close(). Nothing leaves CLOSED: feeding a closed tracker is a bug.
_STATES: dict[State, frozenset[State]] = {
    State.HTTP: frozenset({State.TUNNEL, State.CLOSED}),
    State.TUNNEL: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
_HTTP, _TUNNEL, _CLOSED = State.HTTP, State.TUNNEL, State.CLOSED


class Http1Tracker:
    """Pairs the requests and responses of one HTTP/1.x connection into `Exchange` records.

    Feed each direction's bytes in the order they were seen, with their time; each call
    returns the events it caused (`Exchange`, `TunnelOpened`, `TunnelClosed`). A
    `PeerError` leaves the tracker usable (that direction resynchronises) and carries the
    events produced before it as `.events`.
    """

    def __init__(self, *, midstream: bool = False) -> None:
        """`midstream`: the capture began inside the connection; skip to the first message start."""
        # per connection
        self.state = _HTTP
        self.pending: deque[Exchange] = deque()  # requests seen, response not finished; [0] is answered next
        self.events: list[Event] = []  # of the current call
        self.request = RequestReader(self, midstream=midstream)
        self.response = ResponseReader(self, midstream=midstream)
        self._t = 0  # time of the bytes being fed
        self._request_t = 0  # when the request being read began
        self._response_t = 0
        self._reading: Exchange | None = None  # the request whose head was read and whose body is not finished
        self._upgrade: Exchange | None = None  # an Upgrade/CONNECT request waiting for its answer
        # per tunnel
        self.tunnel_request_bytes = 0
        self.tunnel_response_bytes = 0
        self.tunnel_start_ns = 0

    def __repr__(self) -> str:
        return (f"<Http1Tracker state={self.state.name} request={self.request.phase.name} "
                f"response={self.response.phase.name} pending={len(self.pending)}>")

    @property
    def buffered(self) -> int:
        """Bytes this tracker holds."""
        r, s = self.request, self.response
        return len(r.held) + len(s.held) + len(r.resync_buf) + len(s.resync_buf)

    def _move(self, new: State) -> None:
        if new not in _STATES[self.state]:
            raise LocalError(f"Http1Tracker: no transition {self.state.name} -> {new.name}")
        self.state = new

    def _begin_call(self, what: str) -> list[Event]:
        if self.state is _CLOSED:
            raise LocalError(f"Http1Tracker.{what}() in state CLOSED")
        self.events = []
        return self.events

    # -- entry points ---------------------------------------------------------------------

    def feed_request(self, data: bytes, t_ns: int) -> list[Event]:
        """Client-to-server bytes, received at `t_ns`."""
        self.events = events = []
        if self.state is not _HTTP:
            self._begin_call("feed_request")
            self.tunnel_request_bytes += len(data)
            return events
        self._t = t_ns
        reader = self.request
        if reader.phase is not _HEAD:
            self._request_t = t_ns
        try:
            reader.feed(data)
        except PeerError as err:
            self._request_error(err)
        return events

    def feed_response(self, data: bytes, t_ns: int) -> list[Event]:
        """Server-to-client bytes, received at `t_ns`."""
        self.events = events = []
        if self.state is not _HTTP:
            self._begin_call("feed_response")
            self.tunnel_response_bytes += len(data)
            return events
        self._t = t_ns
        reader = self.response
        if reader.phase is not _HEAD:
            self._response_t = t_ns
        try:
            reader.feed(data)
        except PeerError as err:
            ex = self._answering()
            if ex is not None:
                if not ex.response_start_ns:
                    ex.response_start_ns = self._response_t
                self._incomplete(ex, "protocol_error")
                self.finish(ex, t_ns)
            err.events = events
            raise
        return events

    def feed_request_eof(self, t_ns: int) -> list[Event]:
        """The client half-closed: a request cut short is marked incomplete."""
        events = self._begin_call("feed_request_eof")
        if self.state is _HTTP and self.request.feed_eof() and self._reading is not None:
            self._reading.request_body_bytes = self.request.body_bytes
            self._incomplete(self._reading, "truncated")
        self._reading = None
        return events

    def feed_response_eof(self, t_ns: int) -> list[Event]:
        """The server closed: ends a body delimited by close, then the connection."""
        events = self._begin_call("feed_response_eof")
        self._t = t_ns
        in_body = self.response.phase is Phase.BODY
        if self.state is _HTTP and self.response.feed_eof():
            ex = self._answering()
            if ex is not None:
                if in_body:
                    ex.response_body_bytes = self.response.body_bytes
                self._incomplete(ex, "truncated")
                self.finish(ex, t_ns)
        self._close(t_ns, "no_response")
        return events

    def close(self, t_ns: int, error: str = "closed") -> list[Event]:
        """The connection is gone (reset, idle expiry, end of capture): flush what is pending."""
        if self.state is _CLOSED:
            self.events = []
            return self.events
        events = self._begin_call("close")
        self._close(t_ns, error)
        return events

    def gap(self, direction: Direction, nbytes: int, t_ns: int) -> list[Event]:
        """`nbytes` of `direction` were lost: mark the exchange they hit incomplete and
        resynchronise at the next message start of that direction."""
        events = self._begin_call("gap")
        if self.state is _TUNNEL:
            if direction == "request":
                self.tunnel_request_bytes += nbytes
            else:
                self.tunnel_response_bytes += nbytes
            return events
        self._t = t_ns
        if direction == "request":
            reader = self.request
            ex = self._reading or (self._upgrade if reader.phase is _UPGRADE_WAIT else None)
            if ex is None and reader.phase is _IDLE and len(self.pending) < MAX_PENDING_EXCHANGES:
                ex = self._placeholder(t_ns)  # the lost bytes start a request: its answer still pairs
            if ex is not None:
                if ex is self._reading and reader.phase is Phase.BODY:
                    ex.request_body_bytes = reader.body_bytes + nbytes
                self._incomplete(ex, "gap")
            self._reading = None
            if reader.phase is _UPGRADE_WAIT:
                self._upgrade = None
            reader.resync("gap")
        else:
            reader = self.response
            if reader.phase is not Phase.RESYNC and reader.phase is not Phase.CLOSED:
                ex = self._answering()
                if ex is not None:
                    ex.response_body_bytes = (reader.body_bytes if reader.phase is Phase.BODY else 0) + nbytes
                    self._incomplete(ex, "gap")
                    self.finish(ex, t_ns)
            reader.resync("gap")
        return events

    # -- the readers' callbacks -------------------------------------------------------------

    def on_request(self, head: RequestHead) -> None:
        if len(self.pending) >= MAX_PENDING_EXCHANGES:
            self.request.resync("overflow")
            raise PeerError(f"more than MAX_PENDING_EXCHANGES={MAX_PENDING_EXCHANGES} unanswered requests", status=429)
        ex = Exchange(request_start_ns=self._request_t, method=head.method, path=head.path,
                      authority=head.authority, version=head.version)
        if head.traceparent is not None:
            ex.traceparent = head.traceparent.decode("latin-1")
        if head.tracestate is not None:
            ex.tracestate = head.tracestate.decode("latin-1")
        if head.request_id is not None:
            ex.x_request_id = head.request_id.decode("latin-1")
        self.pending.append(ex)
        self.response.expect(head.method)
        self._reading = ex
        if head.upgrade:
            self._upgrade = ex

    def on_request_end(self, head: RequestHead, body_bytes: int) -> None:
        ex = self._reading
        if ex is not None:
            ex.request_body_bytes = body_bytes
        self._reading = None
        self._request_t = self._t  # a pipelined request in the same bytes begins now

    def on_response(self, head: ResponseHead) -> None:
        ex = self._answering()
        if ex is None:  # a response nobody asked for (or whose request we never saw)
            ex = Exchange(request_start_ns=0, incomplete=True, error="no_request")
            self.pending.append(ex)
        if not ex.response_start_ns:
            ex.response_start_ns = self._response_t
        if head.interim:
            return
        ex.status = head.status
        ex.upgraded = head.upgraded
        if not ex.version:
            ex.version = head.version

    def on_response_end(self, head: ResponseHead, body_bytes: int) -> None:
        ex = self._answering()
        if ex is None:
            return
        ex.response_body_bytes = body_bytes
        self.finish(ex, self._t)
        self._response_t = self._t
        if ex is self._upgrade and not head.upgraded:
            self._upgrade = None
            self.request.upgrade_answered(False)  # refused: what the client sent after it is HTTP again

    def on_tunnel(self, rest: bytes) -> None:
        self._move(_TUNNEL)
        self.tunnel_start_ns = self._t
        self.tunnel_response_bytes += len(rest)
        self.tunnel_request_bytes += len(self.request.upgrade_answered(True))
        self._upgrade = None
        self.events.append(TunnelOpened(self._t))

    # -- internals ------------------------------------------------------------------------

    def _answering(self) -> Exchange | None:
        return self.pending[0] if self.pending else None

    def _placeholder(self, t_ns: int) -> Exchange:
        ex = Exchange(request_start_ns=t_ns)
        self.pending.append(ex)
        self.response.expect("")
        return ex

    @staticmethod
    def _incomplete(ex: Exchange, error: str) -> None:
        ex.incomplete = True
        ex.error = ex.error or error

    def _request_error(self, err: PeerError) -> None:
        if self._reading is not None:
            self._incomplete(self._reading, "protocol_error")
        elif len(self.pending) < MAX_PENDING_EXCHANGES and err.status != 429:
            # garbage before any request line: the server will answer it, so it holds a place
            self._incomplete(self._placeholder(self._t), "protocol_error")
        self._reading = None
        err.events = self.events
        raise err

    def finish(self, ex: Exchange, t_ns: int) -> None:
        ex.response_end_ns = t_ns
        if not ex.status and self.response.methods:
            self.response.methods.popleft()  # its response head was never read: keep the queue aligned
        if self.pending and self.pending[0] is ex:
            self.pending.popleft()
        else:  # by identity: two lost requests' placeholders compare equal
            for i, queued in enumerate(self.pending):
                if queued is ex:
                    del self.pending[i]
                    break
        if self._reading is ex:
            ex.request_body_bytes = self.request.body_bytes
            self._reading = None  # answered before fully sent (413, 408): the rest is read, not recorded
        self.events.append(ex)

    def _close(self, t_ns: int, error: str) -> None:
        if self.state is _TUNNEL:
            self.events.append(TunnelClosed(self.tunnel_request_bytes, self.tunnel_response_bytes,
                                            self.tunnel_start_ns, t_ns))
        while self.pending:
            ex = self.pending[0]
            self._incomplete(ex, error)
            self.finish(ex, t_ns)
        for reader in (self.request, self.response):
            reader.feed_eof()
        self._move(_CLOSED)

"""HTTP/1.1 exchange tracking for one connection, seen from both directions.

The proxy feeds the bytes of its two sockets, the tap the two reassembled TCP
streams; both get the same events and one `Exchange` record per request/response
pair. No I/O and no clock: every entry point takes the time (ns) of its bytes.
httptools (llhttp) does the header and body framing; this module adds what
llhttp cannot know from one direction alone: pairing, HEAD and CONNECT
responses, interim 1xx, upgrades to a tunnel, header limits and gap recovery.
"""
from __future__ import annotations

import enum
from collections import deque

import httptools

from meshlens.protocols.errors import LocalError, PeerError
from meshlens.protocols.exchange import Event, Exchange, RequestHead, ResponseHead, TunnelClosed, TunnelOpened
from meshlens.protocols.http1_side import (
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_PENDING_EXCHANGES,
    RESYNC_WINDOW,
    Direction,
    Phase,
    Side,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_PENDING_EXCHANGES",
    "RESYNC_WINDOW",
    "Direction",
    "Event",
    "Exchange",
    "Http1Tracker",
    "Phase",
    "RequestHead",
    "ResponseHead",
    "State",
    "TunnelClosed",
    "TunnelOpened",
]


class State(enum.Enum):
    """The connection."""

    __hash__ = object.__hash__  # as Phase: identity hashing, off Enum's slow path

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


class Http1Tracker:
    """Pairs the requests and responses of one HTTP/1.x connection into `Exchange` records.

    Feed each direction's bytes in the order they were seen, with their time; each call
    returns the events it caused. A `PeerError` leaves the tracker usable (that direction
    resynchronises) and carries the events produced before it as `.events`.
    """

    def __init__(self, *, midstream: bool = False) -> None:
        """`midstream`: the capture began inside the connection; skip to the first message start."""
        # per connection
        self.state = State.HTTP
        self.pending: deque[Exchange] = deque()  # requests seen, response not finished; [0] is answered next
        self.events: list[Event] = []  # of the current call
        self.request = Side(self, "request")
        self.response = Side(self, "response")
        # responses whose end of head must be found by us, not llhttp (HEAD, CONNECT, Upgrade)
        self.head_scan: set[int] = set()
        self._upgrade_exchange: Exchange | None = None
        self._upgrade_refused = False
        # per tunnel
        self.tunnel_request_bytes = 0
        self.tunnel_response_bytes = 0
        self.tunnel_start_ns = 0
        if midstream:
            self.request.start_resync("midstream")
            self.response.start_resync("midstream")

    def __repr__(self) -> str:
        return (
            f"<Http1Tracker state={self.state.name} request={self.request.phase.name} "
            f"response={self.response.phase.name} pending={len(self.pending)}>"
        )

    @property
    def buffered(self) -> int:
        """Bytes this tracker holds (httptools holds at most one partial header field more)."""
        r, s = self.request, self.response
        return len(r.held) + len(s.held) + len(r.resync_buf) + len(s.resync_buf)

    def _move(self, new: State) -> None:
        if new not in _STATES[self.state]:
            raise LocalError(f"Http1Tracker: no transition {self.state.name} -> {new.name}")
        self.state = new

    def _begin_call(self, what: str) -> list[Event]:
        if self.state is State.CLOSED:
            raise LocalError(f"Http1Tracker.{what}() in state CLOSED")
        self.events = []
        return self.events

    # -- entry points ---------------------------------------------------------------------

    def feed_request(self, data: bytes, t_ns: int) -> list[Event]:
        """Client-to-server bytes, received at `t_ns`."""
        if self.state is not State.HTTP:
            return self._feed_tunnel("feed_request", data)
        self.events = events = []
        side = self.request
        side.t_ns = t_ns
        if side.phase is Phase.IDLE or side.phase is Phase.BODY:
            self._execute(side, data)  # the common case, without _feed's loop
        else:
            self._feed(side, bytes(data))
        return events

    def feed_response(self, data: bytes, t_ns: int) -> list[Event]:
        """Server-to-client bytes, received at `t_ns`."""
        if self.state is not State.HTTP:
            return self._feed_tunnel("feed_response", data)
        self.events = events = []
        side = self.response
        side.t_ns = t_ns
        if (side.phase is Phase.IDLE or side.phase is Phase.BODY) and not self.head_scan:
            self._execute(side, data)
        else:
            self._feed(side, bytes(data))
        if self._upgrade_refused:
            self._release_upgrade_hold()
        return events

    def _feed_tunnel(self, what: str, data: bytes) -> list[Event]:
        events = self._begin_call(what)  # raises in CLOSED
        if what == "feed_request":
            self.tunnel_request_bytes += len(data)
        else:
            self.tunnel_response_bytes += len(data)
        return events

    def feed_request_eof(self, t_ns: int) -> list[Event]:
        """The client half-closed: a request cut short is marked incomplete."""
        events = self._begin_call("feed_request_eof")
        side = self.request
        if self.state is State.HTTP and side.phase is not Phase.CLOSED:
            if side.phase in (Phase.HEAD, Phase.BODY) and side.exchange is not None:
                side.exchange.incomplete = True
                side.exchange.error = side.exchange.error or "truncated"
            side.held.clear()
            side.resync_buf.clear()
            side.exchange = None
            side.move(Phase.CLOSED)
        return events

    def feed_response_eof(self, t_ns: int) -> list[Event]:
        """The server closed: ends a body delimited by close, then the connection."""
        events = self._begin_call("feed_response_eof")
        side = self.response
        side.t_ns = t_ns
        if self.state is State.HTTP and side.phase is Phase.BODY and not side.framed and not side.interim:
            side.on_message_complete()  # RFC 9112 6.3: no length given, the body ends at close
        elif self.state is State.HTTP and (side.phase in (Phase.HEAD, Phase.BODY) or side.held):
            ex = side.exchange or (self.pending[0] if self.pending else None)
            if ex is not None:
                ex.incomplete, ex.error = True, ex.error or "truncated"
                self.finish(ex, t_ns)
        self._close(t_ns, "no_response")
        return events

    def close(self, t_ns: int, error: str = "closed") -> list[Event]:
        """The connection is gone (reset, idle expiry, proxy shutdown): flush what is pending."""
        if self.state is State.CLOSED:
            self.events = []
            return self.events
        events = self._begin_call("close")
        self._close(t_ns, error)
        return events

    def gap(self, direction: Direction, nbytes: int, t_ns: int) -> list[Event]:
        """`nbytes` of `direction` were lost (tap only): mark the exchange they hit incomplete
        and resynchronise at the next message start of that direction."""
        events = self._begin_call("gap")
        if self.state is State.TUNNEL:
            if direction == "request":
                self.tunnel_request_bytes += nbytes
            else:
                self.tunnel_response_bytes += nbytes
            return events
        side = self.request if direction == "request" else self.response
        side.t_ns = t_ns
        if side.phase is Phase.CLOSED:
            side.skipped_bytes += nbytes
            return events
        if side.is_request:
            ex = side.exchange or (self._upgrade_exchange if side.phase is Phase.UPGRADE_WAIT else None)
            if ex is None and side.phase is Phase.IDLE and len(self.pending) < MAX_PENDING_EXCHANGES:
                # the lost bytes start a request: hold its place so later responses still pair
                ex = Exchange(request_start_ns=t_ns)
                self.pending.append(ex)
            if ex is not None:
                ex.incomplete, ex.error = True, ex.error or "gap"
        else:
            ex = side.exchange or (self.pending[0] if self.pending and side.phase is not Phase.RESYNC else None)
            if ex is not None:
                ex.response_body_bytes += nbytes
                ex.incomplete, ex.error = True, ex.error or "gap"
                self.finish(ex, t_ns)
        side.exchange = None
        side.start_resync("gap")
        return events

    # -- internals ------------------------------------------------------------------------

    def finish(self, ex: Exchange, t_ns: int) -> None:
        ex.response_end_ns = t_ns
        if self.pending and self.pending[0] is ex:
            self.pending.popleft()
        else:  # by identity: two lost requests' placeholders compare equal
            for i, queued in enumerate(self.pending):
                if queued is ex:
                    del self.pending[i]
                    break
        self.head_scan.discard(id(ex))
        if self.request.exchange is ex:
            # answered before fully sent (e.g. 413, 408): parse the rest of it into a record nobody sees
            self.request.exchange = Exchange(request_start_ns=ex.request_start_ns)
        if ex is self._upgrade_exchange and not ex.upgraded:
            self._upgrade_refused = True
        self.events.append(ex)

    def _close(self, t_ns: int, error: str) -> None:
        if self.state is State.TUNNEL:
            self.events.append(TunnelClosed(self.tunnel_request_bytes, self.tunnel_response_bytes, self.tunnel_start_ns, t_ns))
        while self.pending:
            ex = self.pending[0]
            ex.incomplete, ex.error = True, ex.error or error
            self.finish(ex, t_ns)
        for side in (self.request, self.response):
            side.held.clear()
            side.resync_buf.clear()
            side.move(Phase.CLOSED)
        self._move(State.CLOSED)

    def _open_tunnel(self, response_rest: int, t_ns: int) -> None:
        self._move(State.TUNNEL)
        self.tunnel_start_ns = t_ns
        self.tunnel_response_bytes += response_rest
        self.tunnel_request_bytes += len(self.request.held)
        self.request.held.clear()
        self._upgrade_exchange = None
        self.events.append(TunnelOpened(t_ns))

    def _release_upgrade_hold(self) -> None:
        """The upgrade was refused: the bytes the client sent after it are HTTP again."""
        self._upgrade_refused = False
        self._upgrade_exchange = None
        side = self.request
        if side.phase is not Phase.UPGRADE_WAIT:
            return
        side.move(Phase.IDLE)
        side.parser = side._new_parser()
        held = bytes(side.held)
        side.held.clear()
        if held:
            self._feed(side, held)

    def _feed(self, side: Side, data: bytes) -> None:
        while data:
            if self.state is not State.HTTP:  # became a tunnel in the middle of these bytes
                if side.is_request:
                    self.tunnel_request_bytes += len(data)
                else:
                    self.tunnel_response_bytes += len(data)
                return
            phase = side.phase
            if phase is Phase.RESYNC:
                i = side.find_start(data)
                if i < 0:
                    return
                data = bytes(side.resync_buf[i:])
                side.skipped_bytes += i
                side.resync_buf.clear()
                side.parser = side._new_parser()
                side.move(Phase.IDLE)
            elif phase is Phase.CLOSED:
                side.skipped_bytes += len(data)  # RFC 9112 9.6: nothing is read after close
                return
            elif phase is Phase.UPGRADE_WAIT:
                if len(side.held) + len(data) > MAX_HEADER_BYTES:
                    self._fail(side, PeerError(f"more than {MAX_HEADER_BYTES} bytes sent before the upgrade was answered", status=side.error_status))
                side.held += data
                return
            elif not side.is_request and self.head_scan:
                data = self._feed_careful(side, data)
            else:
                self._execute(side, data)
                return

    def _execute(self, side: Side, data: bytes) -> None:
        head_from = side.exchange if side.phase is Phase.HEAD else None
        try:
            side.parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self._upgraded(side, data[up.args[0]:])
        except httptools.HttpParserError as e:
            if side.phase is Phase.CLOSED:
                side.skipped_bytes += len(data)  # llhttp: data after `Connection: close`
            elif side.phase is Phase.IDLE and self._pause_on_upgrade(side, e):
                self._upgraded(side, b"")  # 101 without Upgrade headers: llhttp gives no offset
            else:
                cause = e.__context__
                if isinstance(cause, LocalError):
                    raise cause from e
                err = cause if isinstance(cause, PeerError) else PeerError(
                    f"malformed HTTP/1 {side.direction}: {e}", status=side.error_status)
                self._fail(side, err)
        else:
            if head_from is not None and side.phase is Phase.HEAD and side.exchange is head_from:
                try:  # the whole feed was header bytes still being gathered by httptools
                    side._count_head(len(data))
                except PeerError as err:
                    self._fail(side, err)

    @staticmethod
    def _pause_on_upgrade(side: Side, e: Exception) -> bool:
        # llhttp pauses after any 101, but httptools only reports the offset when the
        # response also carried Upgrade headers; otherwise it raises "Pause on CONNECT/Upgrade".
        return not side.is_request and "Upgrade" in str(e)

    def _upgraded(self, side: Side, rest: bytes) -> None:
        if side.is_request:
            # llhttp stops after a request with Upgrade or CONNECT; its response decides what follows
            self._upgrade_exchange = self.pending[-1] if self.pending else None
            if self._upgrade_exchange is not None:
                self.head_scan.add(id(self._upgrade_exchange))
            side.move(Phase.UPGRADE_WAIT)
            side.held += rest
            if len(side.held) > MAX_HEADER_BYTES:
                self._fail(side, PeerError("too many bytes sent before the upgrade was answered", status=side.error_status))
        else:
            self._open_tunnel(len(rest), side.t_ns)

    def _fail(self, side: Side, err: PeerError) -> None:
        if side.is_request and side.exchange is None and len(self.pending) < MAX_PENDING_EXCHANGES:
            # garbage before any request line: the server will answer it, so it holds a place
            side.exchange = Exchange(request_start_ns=side.t_ns)
            self.pending.append(side.exchange)
        if not side.is_request:
            ex = side.exchange or (self.pending[0] if self.pending else None)
            if ex is not None:
                ex.incomplete, ex.error = True, ex.error or "protocol_error"
                self.finish(ex, side.t_ns)
        side.start_resync("protocol_error")
        side.exchange = None
        err.events = self.events
        raise err

    def _feed_careful(self, side: Side, data: bytes) -> bytes:
        """Feed responses while a HEAD, CONNECT or Upgrade answer is pending: llhttp cannot
        know that such a response ends with its headers, so message ends are found here."""
        pos = 0
        while pos < len(data) and self.state is State.HTTP and side.phase in (Phase.IDLE, Phase.HEAD, Phase.BODY):
            if side.phase is Phase.IDLE and self.pending and id(self.pending[0]) in self.head_scan:
                ex = self.pending[0]
                if not ex.response_start_ns:
                    ex.response_start_ns = side.t_ns
                side.held += data[pos:]
                pos = len(data)
                start = 0
                while start < len(side.held) and side.held[start] in b"\r\n":
                    start += 1
                end = side.held.find(b"\r\n\r\n", start)
                if end < 0:
                    if len(side.held) > MAX_HEADER_BYTES:
                        side.exchange = ex
                        self._fail(side, PeerError(f"response headers exceed MAX_HEADER_BYTES={MAX_HEADER_BYTES}", status=502))
                    return b""
                head, data, pos = bytes(side.held[:end + 4]), bytes(side.held[end + 4:]), 0
                side.held.clear()
                self._feed_head(side, head, ex)
            elif side.phase is Phase.IDLE and not self.head_scan:
                return data[pos:]
            else:
                # inside a response followed by a careful one: stop exactly at its end
                step = side.cl_remaining if side.phase is Phase.BODY and side.cl_remaining > 0 else 1
                self._execute(side, data[pos:pos + step])
                pos += step
            if self._upgrade_refused:
                self._release_upgrade_hold()  # before the next response, which may answer those bytes
        return data[pos:]

    def _feed_head(self, side: Side, head: bytes, ex: Exchange) -> None:
        upgraded = False
        try:
            side.parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgraded = True
        except httptools.HttpParserError as e:
            if side.phase is Phase.IDLE and self._pause_on_upgrade(side, e):
                upgraded = True
            else:
                cause = e.__context__
                err = cause if isinstance(cause, PeerError) else PeerError(f"malformed HTTP/1 response: {e}", status=502)
                self._fail(side, err)
        if side.interim and side.phase is Phase.IDLE:
            return  # a 1xx: the final response is still to come
        if ex.method == "HEAD" or ex.upgraded or upgraded:
            if side.phase is Phase.BODY:
                side.on_message_complete()  # RFC 9112 6.3: no body after HEAD, 101 or CONNECT 2xx
            side.parser = side._new_parser()
            if ex.upgraded or upgraded:
                self._open_tunnel(0, side.t_ns)

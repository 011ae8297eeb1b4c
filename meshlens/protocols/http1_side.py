"""One direction of an HTTP/1.x connection: its httptools (llhttp) parser and callbacks,
the header limits, and the resynchronisation after lost bytes. Driven by `http1.Http1Tracker`."""
from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Literal

import httptools

from meshlens.protocols.errors import LocalError, PeerError
from meshlens.protocols.exchange import Exchange, RequestHead, ResponseHead

if TYPE_CHECKING:
    from meshlens.protocols.http1 import Http1Tracker

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_PENDING_EXCHANGES",
    "RESYNC_WINDOW",
    "Direction",
    "Phase",
    "Side",
]

# Start line + headers of one message. Node's --max-http-header-size default (16 KiB);
# nginx allows 4 x 8 KiB (large_client_header_buffers), Envoy 60 KiB. Over it: 431.
MAX_HEADER_BYTES = 16 * 1024
# Envoy's max_headers_count default. Over it: 431.
MAX_HEADER_COUNT = 100
# Requests parsed but not yet answered. nginx reads pipelined requests one buffer at a
# time; the proxy pauses reading well before this, the tap sees it only from broken peers.
MAX_PENDING_EXCHANGES = 64
# Bytes kept while looking for the next message start after a gap: nginx's 8 KiB
# limit for one request line (large_client_header_buffers 8k).
RESYNC_WINDOW = 8 * 1024

Direction = Literal["request", "response"]

_HEADER_LINE_OVERHEAD = 4  # ": " and CRLF, counted as Node does for its header limit
_NO_BODY_METHODS = frozenset({"HEAD", "CONNECT"})
# Header fields read on the way past: framing ones, and request ones copied to Exchange fields.
_NOTED: dict[bytes, str] = {
    b"content-length": "content-length",
    b"transfer-encoding": "transfer-encoding",
    b"host": "authority",
    b"traceparent": "traceparent",
    b"tracestate": "tracestate",
    b"x-request-id": "x_request_id",
}
_NOTED_LENGTHS = frozenset(len(name) for name in _NOTED)
_METHODS = rb"GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH|PROPFIND|PROPPATCH|MKCOL|COPY|MOVE|LOCK|UNLOCK|REPORT|SEARCH|PURGE"
_REQUEST_START = re.compile(rb"(?:" + _METHODS + rb") [^\s]+ HTTP/1\.[01]\r\n")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] [1-5][0-9]{2}(?: [^\r\n]*)?\r\n")


class Phase(enum.Enum):
    """One direction of the connection while it is HTTP."""

    __hash__ = object.__hash__  # members are singletons; Enum's name hashing is slow on the hot path

    IDLE = "idle"  # between messages
    HEAD = "head"  # start line and headers
    BODY = "body"  # after the headers, until the message ends
    UPGRADE_WAIT = "upgrade_wait"  # request asked for Upgrade/CONNECT; its response decides
    RESYNC = "resync"  # bytes were lost; skipping to the next message start
    CLOSED = "closed"  # no more messages in this direction (Connection: close, EOF)


# Rules: a message goes IDLE -> HEAD -> BODY -> IDLE; any phase may fall into RESYNC
# (gap or malformed bytes) or CLOSED (EOF); RESYNC leaves only to IDLE (message start
# found); only the request side waits in UPGRADE_WAIT (entered when llhttp stops after
# an Upgrade/CONNECT request), which a refused upgrade ends in IDLE (and an accepted
# one moves the whole connection to State.TUNNEL).
_PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.HEAD, Phase.UPGRADE_WAIT, Phase.RESYNC, Phase.CLOSED}),
    Phase.HEAD: frozenset({Phase.BODY, Phase.RESYNC, Phase.CLOSED}),
    Phase.BODY: frozenset({Phase.IDLE, Phase.UPGRADE_WAIT, Phase.RESYNC, Phase.CLOSED}),
    Phase.UPGRADE_WAIT: frozenset({Phase.IDLE, Phase.RESYNC, Phase.CLOSED}),
    Phase.RESYNC: frozenset({Phase.IDLE, Phase.RESYNC, Phase.CLOSED}),
    Phase.CLOSED: frozenset({Phase.CLOSED, Phase.RESYNC}),
}


def _split_target(target: str, method: str) -> tuple[str, str]:
    """(path without query, authority from the target) for origin-, absolute- and authority-form."""
    if method == "CONNECT":
        return "", target
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    else:
        authority, path = "", target
    q = path.find("?")
    return (path if q < 0 else path[:q]), authority


class Side:
    """One direction: an httptools parser and what this direction knows. Also its callback object."""

    def __init__(self, tracker: Http1Tracker, direction: Direction) -> None:
        # per connection
        self.tracker = tracker
        self.direction = direction
        self.is_request = direction == "request"
        self.error_status = 400 if self.is_request else 502
        self.phase = Phase.IDLE
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser = self._new_parser()
        self.t_ns = 0
        self.held = bytearray()  # request bytes after an upgrade request; response head before HEAD/CONNECT check
        self.resync_buf = bytearray()
        self.skipped_bytes = 0
        # per message
        self.exchange: Exchange | None = None
        self.target = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.framed = False  # Content-Length or chunked: the body does not end at EOF
        self.cl_remaining = 0  # response body bytes still due by Content-Length; -1 when chunked
        self.keep_alive = True
        self.interim = False

    def __repr__(self) -> str:
        return f"<Side {self.direction} phase={self.phase.name}>"

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return httptools.HttpRequestParser(self) if self.is_request else httptools.HttpResponseParser(self)

    def move(self, new: Phase) -> None:
        if new not in _PHASES[self.phase]:
            raise LocalError(f"{self.direction} side: no transition {self.phase.name} -> {new.name}")
        self.phase = new

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.move(Phase.HEAD)
        self.target.clear()
        self.headers = []
        self.head_bytes = 0
        self.framed = False
        self.cl_remaining = 0
        self.interim = False
        tracker = self.tracker
        if self.is_request:
            if len(tracker.pending) >= MAX_PENDING_EXCHANGES:
                raise PeerError(f"more than MAX_PENDING_EXCHANGES={MAX_PENDING_EXCHANGES} unanswered requests", status=429)
            self.exchange = Exchange(request_start_ns=self.t_ns)
            tracker.pending.append(self.exchange)
        else:
            if self.exchange is None:
                if tracker.pending:
                    self.exchange = tracker.pending[0]
                else:  # a response nobody asked for (or whose request we never saw)
                    self.exchange = Exchange(request_start_ns=0, incomplete=True, error="no_request")
                    tracker.pending.append(self.exchange)
            if not self.exchange.response_start_ns:
                self.exchange.response_start_ns = self.t_ns

    def on_url(self, url: bytes) -> None:
        self.target += url
        self._count_head(len(url))

    def on_status(self, status: bytes) -> None:
        self._count_head(len(status) + 13)  # "HTTP/1.1 200 " + CRLF, roughly

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + _HEADER_LINE_OVERHEAD
        if self.head_bytes > MAX_HEADER_BYTES:
            self._too_large()
        if self.phase is not Phase.HEAD:
            return  # a trailer: counted, not interpreted
        headers = self.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADER_COUNT:
            raise PeerError(f"more than MAX_HEADER_COUNT={MAX_HEADER_COUNT} header fields", status=431 if self.is_request else 502)
        if len(name) not in _NOTED_LENGTHS:
            return
        noted = _NOTED.get(name.lower())
        if noted is None:
            return
        if noted == "content-length":
            self.framed = True
            if not self.is_request and value.strip().isdigit():
                self.cl_remaining = int(value)
        elif noted == "transfer-encoding" and b"chunked" in value.lower():
            self.framed = True
            self.cl_remaining = -1  # RFC 9112 6.3: chunked overrides any Content-Length
        elif self.is_request:
            setattr(self.exchange, noted, value.decode("latin-1"))

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEADER_BYTES:
            self._too_large()

    def _too_large(self) -> None:
        raise PeerError(
            f"{self.direction} headers exceed MAX_HEADER_BYTES={MAX_HEADER_BYTES}",
            status=431 if self.is_request else 502,
        )

    def on_headers_complete(self) -> None:
        self.move(Phase.BODY)
        ex = self.exchange
        assert ex is not None
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        version = parser.get_http_version()
        if self.is_request:
            method = parser.get_method().decode("ascii")  # type: ignore[union-attr]
            target = self.target.decode("latin-1")
            ex.method = method
            ex.version = version
            ex.path, target_authority = _split_target(target, method)
            if method in _NO_BODY_METHODS and self.tracker.pending and self.tracker.pending[-1] is ex:
                self.tracker.head_scan.add(id(ex))
            if not ex.authority:
                ex.authority = target_authority
            self.tracker.events.append(RequestHead(method, target, self.headers, self.keep_alive, self.t_ns))
        else:
            status = parser.get_status_code()  # type: ignore[union-attr]
            self.interim = 100 <= status < 200 and status != 101
            if not self.interim:
                ex.status = status
                ex.upgraded = status == 101 or (ex.method == "CONNECT" and 200 <= status < 300)
            if not ex.version:
                ex.version = version
            self.tracker.events.append(ResponseHead(status, self.headers, self.interim, self.t_ns))

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        if self.is_request:
            ex.request_body_bytes += len(body)
        else:
            ex.response_body_bytes += len(body)
            if self.cl_remaining > 0:
                self.cl_remaining -= len(body)

    def on_message_complete(self) -> None:
        if self.is_request:
            self.move(Phase.IDLE)
            self.exchange = None
            if not self.keep_alive and not self.parser.should_upgrade():  # the upgrade's answer decides
                self.move(Phase.CLOSED)
        elif self.interim:
            self.move(Phase.IDLE)
        else:
            self.move(Phase.IDLE)
            self.tracker.finish(self.exchange, self.t_ns)  # type: ignore[arg-type]
            self.exchange = None
            if not self.keep_alive:
                self.move(Phase.CLOSED)

    # -- recovery -----------------------------------------------------------------------

    def start_resync(self, error: str) -> None:
        """Drop the parser and skip to the next message start; the current exchange is incomplete."""
        ex = self.exchange
        if ex is not None:
            ex.incomplete = True
            ex.error = ex.error or error
        self.held.clear()
        self.resync_buf.clear()
        self.move(Phase.RESYNC)

    def find_start(self, data: bytes) -> int:
        """Offset in resync_buf + data of the next message start, or -1 (keeping a bounded tail).

        A start line is looked for anywhere, not only after a newline: the next response
        follows the last body byte directly. Requiring the whole line (method, target,
        version, CRLF) keeps a body that merely mentions `GET` from matching."""
        buf = self.resync_buf
        buf += data
        m = (_REQUEST_START if self.is_request else _RESPONSE_START).search(buf)
        if m is not None:
            return m.start()
        keep_from = max(0, len(buf) - RESYNC_WINDOW)
        self.skipped_bytes += keep_from
        del buf[:keep_from]
        return -1

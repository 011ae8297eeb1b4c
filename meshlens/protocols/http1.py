"""The HTTP/1.1 codec: one reader per direction, bytes in, the consumer's callbacks out.

The proxy feeds it its two sockets' bytes; the tap (through `http1_tracker`) the two
reassembled TCP streams. No I/O and no clock. A reader finds each message's bounds
itself (the end of the head, Content-Length, chunk sizes) so that it can hand over
the exact bytes of each message (the proxy forwards them and splices fields into a
head instead of rebuilding it), and feeds the same bytes to llhttp (httptools), which
validates them and has the last word: a message that llhttp does not end exactly
where the reader does is a peer error, never a guess (request smuggling lives in
such disagreements).

Cheap on purpose (bench/http1.py): per message one llhttp call for the head (and one
per body piece), a callback per header field that is only a dict lookup unless the
field is one someone reads (`RequestHead`, `ResponseHead` hold them), and the
consumer's callbacks, of which only those it defines are called:

    RequestReader:   on_request(head)   on_request_body(data)   on_request_end(head, body_bytes)
    ResponseReader:  on_response(head)  on_response_body(data)  on_response_end(head, body_bytes)
                     on_tunnel(data)    (after a 101, or a 2xx to CONNECT: what followed the head)

Body data is passed as it was framed on the wire (chunk sizes and trailers
included); `body_bytes` counts the body after transfer decoding. A response's
framing depends on its request (HEAD, CONNECT): the driver calls `expect(method)`
on the response reader for each request sent, in order.

A `PeerError` raised by `feed` leaves the reader resynchronising (it skips to the
next message start), so that the tap carries on; the proxy answers its status and
closes.
"""
from __future__ import annotations

import enum
import re
from collections import deque
from typing import Any

import httptools

from meshlens.protocols.errors import LocalError, PeerError

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "MAX_PENDING_EXCHANGES",
    "RESYNC_WINDOW",
    "Phase",
    "RequestHead",
    "RequestReader",
    "ResponseHead",
    "ResponseReader",
]

# Start line + headers of one message. Node's --max-http-header-size default (16 KiB);
# nginx allows 4 x 8 KiB (large_client_header_buffers), Envoy 60 KiB. Over it: 431 (502 upstream).
MAX_HEADER_BYTES = 16 * 1024
# Envoy's max_headers_count default. Over it: 431.
MAX_HEADER_COUNT = 100
# Requests read but not yet answered, per connection. nginx reads pipelined requests one
# buffer at a time; the proxy stops reading well before this, the tap sees it from broken peers.
MAX_PENDING_EXCHANGES = 64
# Bytes kept while looking for the next message start after a gap: nginx's 8 KiB
# limit for one request line (large_client_header_buffers 8k).
RESYNC_WINDOW = 8 * 1024
# One chunk-size line with its extensions: Node bounds chunk extensions at 16 KiB (CVE-2024-22019).
MAX_CHUNK_LINE = 16 * 1024

_CHUNKED, _UNTIL_EOF = -1, -2  # body framing other than a Content-Length
_SMALL_HEAD = 4 * MAX_HEADER_COUNT  # a head this short cannot break either limit: a field line is >= 4 bytes
_METHODS = rb"GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH|PROPFIND|PROPPATCH|MKCOL|COPY|MOVE|LOCK|UNLOCK|REPORT|SEARCH|PURGE"
_REQUEST_START = re.compile(rb"(?:" + _METHODS + rb") [^\s]+ HTTP/1\.[01]\r\n")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] [1-5][0-9]{2}(?: [^\r\n]*)?\r\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_METHOD_NAMES = {m: m.decode() for m in _METHODS.split(b"|")}


class Phase(enum.Enum):
    """One direction of a connection."""

    __hash__ = object.__hash__  # members are singletons; Enum's name hashing is slow on the hot path

    IDLE = "idle"  # between messages
    HEAD = "head"  # part of a head is held, its end not yet seen
    BODY = "body"  # after the head, until the message ends
    UPGRADE_WAIT = "upgrade_wait"  # request side: an Upgrade or CONNECT request was read; its answer decides
    TUNNEL = "tunnel"  # no longer HTTP (an accepted upgrade): nothing is parsed
    RESYNC = "resync"  # bytes were lost or malformed: skipping to the next message start
    CLOSED = "closed"  # no more messages this way (Connection: close, EOF)


# Rules: a message goes IDLE (-> HEAD) -> BODY -> IDLE, or IDLE -> IDLE when it has no body;
# an upgrade request moves the request side to UPGRADE_WAIT, whose answer leads to TUNNEL or
# back to IDLE; an accepted upgrade moves the response side to TUNNEL. Any HTTP phase may fall
# into RESYNC (a gap, malformed bytes), which leaves only to IDLE; everything ends in CLOSED.
_PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.HEAD, Phase.BODY, Phase.IDLE, Phase.UPGRADE_WAIT, Phase.TUNNEL, Phase.RESYNC, Phase.CLOSED}),
    Phase.HEAD: frozenset({Phase.BODY, Phase.IDLE, Phase.UPGRADE_WAIT, Phase.TUNNEL, Phase.RESYNC, Phase.CLOSED}),
    Phase.BODY: frozenset({Phase.IDLE, Phase.RESYNC, Phase.CLOSED}),
    Phase.UPGRADE_WAIT: frozenset({Phase.IDLE, Phase.TUNNEL, Phase.RESYNC, Phase.CLOSED}),
    Phase.TUNNEL: frozenset({Phase.CLOSED}),
    Phase.RESYNC: frozenset({Phase.IDLE, Phase.RESYNC, Phase.CLOSED}),
    Phase.CLOSED: frozenset({Phase.CLOSED}),
}

# Members as module constants: an Enum attribute lookup costs ~0.2 us in Python 3.11, measured.
_IDLE, _HEAD, _BODY, _UPGRADE_WAIT, _TUNNEL, _RESYNC, _CLOSED = (
    Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.UPGRADE_WAIT, Phase.TUNNEL, Phase.RESYNC, Phase.CLOSED)

# Header fields read on the way past: the name's bytes in its usual spellings -> the head
# attribute its value goes to (one dict lookup a field); other spellings of these lengths
# are lowered first. "" marks common fields whose length collides: skipped at once.
_CONNECTION, _HOP = "connection", "hop"
_REQUEST_NAMES = {"host": "host", "traceparent": "traceparent", "tracestate": "tracestate",
                  "x-request-id": "request_id", "content-length": "content_length_field",
                  "transfer-encoding": "transfer_encoding", "connection": _CONNECTION, "keep-alive": _HOP,
                  "proxy-connection": _HOP, "te": _HOP, "upgrade": _HOP}
_RESPONSE_NAMES = {"content-length": "content_length_field", "transfer-encoding": "transfer_encoding",
                   "connection": _CONNECTION, "keep-alive": _HOP, "proxy-connection": _HOP, "upgrade": _HOP}
_PLAIN = frozenset({"host", "traceparent", "tracestate", "request_id", "content_length_field", "transfer_encoding"})
_SKIPPED = ("user-agent", "content-type", "accept-encoding", "accept-language", "referer", "set-cookie",
            "last-modified", "x-forwarded-for", "cache-control", "authorization")


def _spellings(names: dict[str, str]) -> dict[bytes, str]:
    """Each name lowercase and Capitalized-Per-Word (and the usual odd ones) -> its attribute."""
    out: dict[bytes, str] = {}
    for name, attr in [*names.items(), *((n, "") for n in _SKIPPED if n not in names)]:
        out[name.encode()] = attr
        out["-".join(p.capitalize() for p in name.split("-")).encode()] = attr
    for odd in ("TE", "X-Request-ID", "WWW-Authenticate"):
        if odd.lower() in names:
            out[odd.encode()] = names[odd.lower()]
    return out


class RequestHead:
    """A request's head, complete: what the proxy routes on and the tap records.

    Attributes not set on an instance read their class default (no __init__: a head costs
    one allocation on the hot path)."""

    method = ""
    target = b""
    """As sent: origin-form, absolute-form, or host:port for CONNECT."""
    path = ""
    """The target's path without query; '' for CONNECT."""
    authority = ""
    """The Host field, else the authority of an absolute-form or CONNECT target."""
    version = "1.1"
    keep_alive = True
    upgrade = False
    """An Upgrade or CONNECT request: what follows belongs to the answer."""
    content_length = -1
    chunked = False
    hop_by_hop = False
    """Keep-Alive, Proxy-Connection, TE, Upgrade, or a Connection other than keep-alive, is present
    (a proxy rebuilds such heads; others it forwards as they are, with fields spliced in)."""
    connection = b""
    """The Connection field(s), lowercased."""
    host: bytes | None = None
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    request_id: bytes | None = None
    """x-request-id."""
    extra: dict[bytes, bytes] | None = None
    """Values of the reader's `extra` fields that were present (lowercase name -> value)."""
    raw = b""
    """The head exactly as received (start line to the empty line)."""
    content_length_field: bytes | None = None
    transfer_encoding: bytes | None = None
    deadline: float | None = None
    """A gRPC call's grpc-timeout in seconds, when the sidecar sends it on as HTTP/2 (proxy/h2_fields.grpc_of_h1)."""

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.target!r} HTTP/{self.version}>"


class ResponseHead:
    """A response's head, complete; `interim` for a 1xx other than 101. Defaults as RequestHead's."""

    status = 0
    version = "1.1"
    keep_alive = True
    interim = False
    upgraded = False
    """A 101, or a 2xx to CONNECT: the connection is a tunnel after this head."""
    content_length = -1
    chunked = False
    hop_by_hop = False
    """Keep-Alive, Proxy-Connection, Upgrade, or a Connection other than keep-alive, is present."""
    connection = b""
    method = ""
    """The method of the request this answers ('' when unknown)."""
    grpc_status = -1
    """(HTTP/1.1 carries no gRPC: the sidecar's HTTP/2 heads, proxy/h2_fields.py, do.)"""
    raw = b""
    content_length_field: bytes | None = None
    transfer_encoding: bytes | None = None

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"


class _Reader:
    """What both directions share: the phases, the head search, body framing, resync."""

    _FIELDS: dict[bytes, str] = {}
    _LENGTHS: frozenset[int] = frozenset()
    _START: re.Pattern[bytes] = _REQUEST_START
    _FIRST = b""  # bytes a message can begin with
    direction = ""
    error_status = 400

    def __init__(self, consumer: Any, *, midstream: bool = False) -> None:
        # per connection
        self.consumer = consumer
        self.phase = _IDLE
        self.on_header = self._on_header(self._FIELDS, self._LENGTHS)
        self.parser = self._new_parser()
        self.held = bytearray()  # a head not yet complete; request bytes after an upgrade request
        self.resync_buf = bytearray()
        self.skipped_bytes = 0
        """Bytes not parsed: skipped while resynchronising, or after the last message."""
        self._body_cb = getattr(consumer, f"on_{self.direction}_body", None)
        # per message
        self.head: Any = None
        self.body_bytes = 0
        self._left = 0  # Content-Length bytes still due, or _CHUNKED / _UNTIL_EOF
        self._chunk_left = 0  # chunked: bytes of the current chunk's data and CRLF still due
        self._line = bytearray()  # chunked: a size or trailer line split across feeds
        self._trailers = False
        self._trailer_bytes = 0
        self._done = False  # llhttp's on_message_complete
        if midstream:
            self.resync("midstream")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.phase.name}>"

    def _new_parser(self) -> Any:
        raise NotImplementedError

    def move(self, new: Phase) -> None:
        if new not in _PHASES[self.phase]:
            raise LocalError(f"{type(self).__name__}: no transition {self.phase.name} -> {new.name}")
        self.phase = new

    # -- llhttp callbacks (never on_body: llhttp then skips body bytes without calling Python) ---

    def _on_header(self, fields: dict[bytes, str], lengths: frozenset[int]) -> Any:
        """llhttp's per-field callback, as a closure over what it reads: it runs for every field of
        every message, and a miss (most fields) must cost one dict lookup and one length test."""
        get = fields.get
        me = self
        plain = _PLAIN
        set_ = setattr

        def on_header(name: bytes, value: bytes) -> None:
            attr = get(name)
            if attr is None:
                if len(name) not in lengths:
                    return
                attr = get(name.lower())
                if attr is None:
                    return
            if not attr or me.phase is _BODY:  # a common field nobody reads, or a trailer
                return
            if attr in plain:
                set_(me.head, attr, value)
            else:
                me._field(attr, name, value)

        return on_header

    def _field(self, attr: str, name: bytes, value: bytes) -> None:
        head = self.head
        if attr is _CONNECTION:
            value = value.lower()
            head.connection = head.connection + b"," + value if head.connection else value
            if value.strip() != b"keep-alive":  # keep-alive is the default: forwarding it changes nothing
                head.hop_by_hop = True
        elif attr is _HOP:
            head.hop_by_hop = True
        else:  # "extra"
            if head.extra is None:
                head.extra = {}
            head.extra[name.lower()] = value

    def on_message_complete(self) -> None:
        self._done = True

    # -- bytes in ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes of this direction, in order."""
        pos, n = 0, len(data)
        while pos < n:
            phase = self.phase
            if phase is _BODY:
                pos = self._body(data, pos)
            elif phase is _IDLE or phase is _HEAD:
                if self.held:
                    held = self.held
                    old = len(held)
                    held += data if pos == 0 else data[pos:]
                    end = held.find(b"\r\n\r\n", max(0, old - 3))
                    if end < 0:
                        self._check_held()
                        return
                    data, pos, n = bytes(held), 0, len(held)
                    held.clear()
                else:
                    c = data[pos]
                    if c == 13 or c == 10:  # RFC 9112 2.2: empty lines before a message are skipped
                        while pos < n and data[pos] in b"\r\n":
                            pos += 1
                        if pos >= n:
                            return
                    end = data.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if data[pos] not in self._FIRST and self.phase is _IDLE:
                            # not the start of a message (TLS, binary, h2): say so now, not at the timeout
                            raise self._fail(f"not an HTTP/1.x {self.direction}: {data[pos:pos + 16]!r}")
                        self.held += data[pos:]
                        self.phase = _HEAD
                        self._check_held()
                        return
                pos = self._head(data, pos, end + 4)
            elif phase is _RESYNC:
                pos = self._resync(data, pos)
            elif phase is _UPGRADE_WAIT:
                self.held += data[pos:]
                if len(self.held) > MAX_HEADER_BYTES:
                    raise self._fail(f"more than MAX_HEADER_BYTES={MAX_HEADER_BYTES} bytes sent before the upgrade was answered")
                return
            else:  # TUNNEL, CLOSED: RFC 9112 9.6, nothing is read after the last message
                self.skipped_bytes += n - pos
                return

    def _check_held(self) -> None:
        if len(self.held) > MAX_HEADER_BYTES:
            raise self._fail(f"{self.direction} head exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}", 431)

    def _llhttp(self, data: Any) -> None:
        """Body bytes to llhttp, which checks their framing."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise self._llhttp_error(e) from None

    def _head(self, data: bytes, start: int, end: int) -> int:
        raise NotImplementedError

    def _body(self, data: bytes, pos: int) -> int:
        """Body bytes from `pos`; returns where this message's bytes end in `data`."""
        n = len(data)
        left = self._left
        if left >= 0:
            end = pos + left if left < n - pos else n
            self._left = left - (end - pos)
            last = self._left == 0
        elif left == _CHUNKED:
            stop = self._chunks(data, pos)
            last = stop >= 0
            end = stop if last else n
        else:  # until the peer closes: nothing for llhttp to check
            piece = data if pos == 0 else data[pos:]
            self.body_bytes += n - pos
            if self._body_cb is not None:
                self._body_cb(piece)
            return n
        piece = data if pos == 0 and end == n else data[pos:end]
        if left >= 0:
            self.body_bytes += end - pos
        self._llhttp(piece)
        if self._done is not last:
            raise self._fail(f"{self.direction} body framing: llhttp and the reader disagree on where it ends")
        if self._body_cb is not None:
            self._body_cb(piece)
        if last:
            self._message_end()
        return end

    def _whole_body(self, data: bytes, pos: int, length: int, head: Any) -> int:
        """A Content-Length body that is all in `data` from `pos` (the common case): one llhttp
        call and the message's end, without entering BODY. Returns where the message ends."""
        end = pos + length
        piece = data if pos == 0 and end == len(data) else data[pos:end]
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError as e:
            raise self._llhttp_error(e) from None
        if not self._done:
            raise self._fail(f"{self.direction} body framing: llhttp and the reader disagree on where it ends")
        self.body_bytes = length
        if self._body_cb is not None:
            self._body_cb(piece)
        if self._on_end is not None:
            self._on_end(head, length)
        if not head.keep_alive:
            self.move(_CLOSED)
        return end

    def _chunks(self, data: bytes, pos: int) -> int:
        """Walk chunked framing from `pos`: the offset just past the message, or -1 if it goes on."""
        n = len(data)
        while pos < n:
            left = self._chunk_left
            if left:
                step = left if left < n - pos else n - pos
                self._chunk_left = left - step
                if left > 2:  # the data, not its CRLF
                    self.body_bytes += min(step, left - 2)
                pos += step
                continue
            nl = data.find(b"\n", pos)
            line = self._line
            if nl < 0:
                line += data[pos:]
                if len(line) > MAX_CHUNK_LINE:
                    raise self._fail(f"a chunk-size or trailer line exceeds MAX_CHUNK_LINE={MAX_CHUNK_LINE}")
                return -1
            if line:
                line += data[pos:nl + 1]
                text = bytes(line)
                line.clear()
            else:
                text = data[pos:nl + 1]
            pos = nl + 1
            if self._trailers:
                if text == b"\r\n":
                    return pos
                self._trailer_bytes += len(text)
                if self._trailer_bytes > MAX_HEADER_BYTES:
                    raise self._fail(f"trailers exceed MAX_HEADER_BYTES={MAX_HEADER_BYTES}", 431)
                continue
            size = text.split(b";", 1)[0].strip()
            if not size or len(size) > 16 or not _HEX.issuperset(size):
                raise self._fail("malformed chunk size")
            size_n = int(size, 16)
            if size_n:
                self._chunk_left = size_n + 2  # the data and its CRLF (llhttp checks the CRLF)
            else:
                self._trailers = True
        return -1

    def _begin(self, head: Any) -> None:
        self.head = head
        self.body_bytes = 0
        self._done = False

    @staticmethod
    def _frame(head: Any) -> None:
        """A head's body framing from its fields, set before the consumer sees the head."""
        te = head.transfer_encoding
        if te is not None:
            head.chunked = te.rstrip().lower().endswith(b"chunked")  # RFC 9112 6.3: chunked must be last
        elif head.content_length_field is not None:
            head.content_length = int(head.content_length_field)  # llhttp checked the digits

    def _framing(self, head: Any) -> None:
        """After a head that llhttp says a body follows: read that body."""
        if head.chunked:
            self._left = _CHUNKED
            self._chunk_left = 0
            self._trailers = False
            self._trailer_bytes = 0
        elif head.content_length >= 0 and head.transfer_encoding is None:
            self._left = head.content_length
        elif self.error_status == 502:
            self._left = _UNTIL_EOF  # RFC 9112 6.3: a response without length ends when the server closes
            head.keep_alive = False
        else:  # a request llhttp expects a body for, with neither length nor chunked: not ours to guess
            raise self._fail("a request body with neither Content-Length nor chunked Transfer-Encoding")
        self.move(_BODY)

    def _check_head(self, raw: bytes, status: int) -> None:
        if len(raw) > MAX_HEADER_BYTES:
            raise self._fail(f"{self.direction} head exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}", status)
        if raw.count(b"\r\n") > MAX_HEADER_COUNT + 2:
            raise self._fail(f"more than MAX_HEADER_COUNT={MAX_HEADER_COUNT} header fields", status)

    def _llhttp_error(self, e: Exception) -> PeerError:
        cause = e.__context__
        if isinstance(cause, LocalError):
            raise cause from e
        if isinstance(cause, PeerError):
            return self._fail(str(cause), cause.status)
        return self._fail(f"malformed HTTP/1 {self.direction}: {e}")

    def _message_end(self) -> None:
        raise NotImplementedError

    def feed_eof(self) -> bool:
        """The peer closed this direction. True when a message was cut short."""
        phase = self.phase
        truncated = phase is _HEAD or (phase is _BODY and self._left != _UNTIL_EOF)
        if phase is _BODY and self._left == _UNTIL_EOF:
            self._message_end()  # RFC 9112 6.3: no length given, the body ends at close
        self.held.clear()
        self.resync_buf.clear()
        self.phase = _CLOSED
        return truncated

    # -- recovery (the tap) --------------------------------------------------------------------

    def resync(self, reason: str) -> None:
        """Drop what is being parsed and skip to the next message start (bytes were lost)."""
        if self.phase is _CLOSED or self.phase is _TUNNEL:
            return
        self.held.clear()
        self.resync_buf.clear()
        self._line.clear()
        self.head = None
        self.move(_RESYNC)

    def _resync(self, data: bytes, pos: int) -> int:
        buf = self.resync_buf
        buf += data[pos:]
        m = self._START.search(buf)
        if m is None:
            keep_from = max(0, len(buf) - RESYNC_WINDOW)
            self.skipped_bytes += keep_from
            del buf[:keep_from]
            return len(data)
        self.skipped_bytes += m.start()
        rest = bytes(buf[m.start():])
        buf.clear()
        self.parser = self._new_parser()
        self.move(_IDLE)
        self.feed(rest)
        return len(data)

    def _fail(self, message: str, status: int | None = None) -> PeerError:
        """A peer error: this direction resynchronises; the caller raises what this returns."""
        if status is None or self.error_status == 502:
            status = self.error_status
        self.resync("protocol_error")
        return PeerError(message, status=status)


class RequestReader(_Reader):
    """Client-to-server bytes: requests."""

    _FIELDS = _spellings(_REQUEST_NAMES)
    _LENGTHS = frozenset(len(n) for n in _REQUEST_NAMES)
    _START = _REQUEST_START
    _FIRST = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # llhttp knows only upper-case methods
    direction = "request"
    error_status = 400

    def __init__(self, consumer: Any, *, extra: frozenset[bytes] = frozenset(), midstream: bool = False) -> None:
        """`extra`: lowercase names of more fields to read into `RequestHead.extra`."""
        if extra:
            self._FIELDS = {**self._FIELDS, **{n: "extra" for n in extra}}
            self._LENGTHS = self._LENGTHS | {len(n) for n in extra}
        super().__init__(consumer, midstream=midstream)
        self._on_head = consumer.on_request
        self._on_end = getattr(consumer, "on_request_end", None)

    def _new_parser(self) -> Any:
        return httptools.HttpRequestParser(self)

    def _head(self, data: bytes, start: int, end: int) -> int:
        raw = data if start == 0 and end == len(data) else data[start:end]
        if len(raw) > _SMALL_HEAD:
            self._check_head(raw, 431)
        self.head = head = RequestHead()
        head.raw = raw
        self.body_bytes = 0
        self._done = False
        parser = self.parser
        try:
            parser.feed_data(raw)
            upgrade = False
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as e:
            raise self._llhttp_error(e) from None
        method_b = parser.get_method()
        if method_b == b"PRI":  # llhttp reads the HTTP/2 preface as a request awaiting its "SM" line
            raise self._fail("an HTTP/2 connection preface where HTTP/1.1 was expected")
        head.method = method = _METHOD_NAMES.get(method_b) or method_b.decode("ascii")
        line_end = raw.find(b"\r\n")
        head.target = target = raw[len(method_b) + 1:line_end - 9]  # llhttp checked "M SP target SP HTTP/x.y"
        head.version = version = "1.1" if raw[line_end - 1] == 49 else "1.0"  # the minor digit: "1"
        connection = head.connection
        if not connection or connection == b"keep-alive":  # the usual two, without a call
            keep_alive = version == "1.1" or connection == b"keep-alive"
        else:
            keep_alive = _keep_alive(version, connection)
        head.keep_alive = keep_alive
        host = head.host
        if host is not None:
            head.authority = host.decode("latin-1")
        if target[:1] == b"/":
            q = target.find(b"?")
            head.path = (target if q < 0 else target[:q]).decode("latin-1")
        elif method == "CONNECT":
            upgrade = True
            if host is None:
                head.authority = target.decode("latin-1")
        else:
            head.path, authority = _absolute(target)
            if host is None:
                head.authority = authority
        if upgrade:
            head.upgrade = True
        if head.transfer_encoding is not None:
            self._frame(head)
        elif head.content_length_field is not None:
            head.content_length = int(head.content_length_field)  # llhttp checked the digits
        if self.phase is _HEAD:
            self.phase = _IDLE
        self._on_head(head)
        if upgrade:
            # llhttp stops after an Upgrade or CONNECT head (a declared body included: Node reads
            # it the same way); what follows is held until the answer says whose bytes they are
            if self._on_end is not None:
                self._on_end(head, 0)
            self.move(_UPGRADE_WAIT)
        elif self._done:  # no body: the common case, without _framing
            if self._on_end is not None:
                self._on_end(head, 0)
            if not keep_alive:
                self.move(_CLOSED)  # RFC 9112 9.6: nothing is read after Connection: close
        else:
            cl = head.content_length
            if 0 <= cl <= len(data) - end and not head.chunked:
                return self._whole_body(data, end, cl, head)
            self._framing(head)
        return end

    def _message_end(self) -> None:
        head = self.head
        self._end_callback(head)
        if self.phase is _BODY:
            self.move(_IDLE)
        if not head.keep_alive and self.phase is _IDLE:
            self.move(_CLOSED)  # RFC 9112 9.6: nothing is read after Connection: close

    def _end_callback(self, head: RequestHead) -> None:
        if self._on_end is not None:
            self._on_end(head, self.body_bytes)

    def upgrade_answered(self, accepted: bool) -> bytes:
        """The answer to the Upgrade/CONNECT request came: the held bytes go to the tunnel
        (returned) when it was accepted, else they are requests again (parsed, b'' returned)."""
        if self.phase is not _UPGRADE_WAIT:
            return b""
        held = bytes(self.held)
        self.held.clear()
        if accepted:
            self.move(_TUNNEL)
            return held
        self.parser = self._new_parser()
        self.move(_IDLE)
        if not self.head.keep_alive:
            self.move(_CLOSED)
            self.skipped_bytes += len(held)
        elif held:
            self.feed(held)
        return b""


class ResponseReader(_Reader):
    """Server-to-client bytes: responses, framed by the requests they answer (`expect`)."""

    _FIELDS = _spellings(_RESPONSE_NAMES)
    _LENGTHS = frozenset(len(n) for n in _RESPONSE_NAMES)
    _START = _RESPONSE_START
    _FIRST = b"H"
    direction = "response"
    error_status = 502

    def __init__(self, consumer: Any, *, midstream: bool = False) -> None:
        super().__init__(consumer, midstream=midstream)
        self.methods: deque[str] = deque()
        """Methods of the requests sent and not yet answered, oldest first."""
        self._on_head = consumer.on_response
        self._on_end = getattr(consumer, "on_response_end", None)
        self._on_tunnel = getattr(consumer, "on_tunnel", None)

    def _new_parser(self) -> Any:
        return httptools.HttpResponseParser(self)

    def expect(self, method: str) -> None:
        """A request with `method` was sent on this connection ('' when its method is unknown)."""
        self.methods.append(method)

    def _head(self, data: bytes, start: int, end: int) -> int:
        raw = data if start == 0 and end == len(data) else data[start:end]
        if len(raw) > _SMALL_HEAD:
            self._check_head(raw, 502)
        self.head = head = ResponseHead()
        head.raw = raw
        self.body_bytes = 0
        self._done = False
        parser = self.parser
        try:
            parser.feed_data(raw)
            upgrade = False
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as e:
            if "Upgrade" not in str(e):
                raise self._llhttp_error(e) from None
            upgrade = True  # a 101 without Upgrade fields: llhttp pauses, httptools gives no offset
        head.status = status = parser.get_status_code()
        head.version = version = "1.1" if raw[7] == 49 else "1.0"  # "HTTP/1.1": the minor digit
        connection = head.connection
        if not connection or connection == b"keep-alive":  # the usual two, without a call
            keep_alive = version == "1.1" or connection == b"keep-alive"
        else:
            keep_alive = _keep_alive(version, connection)
        head.keep_alive = keep_alive
        unframed = False
        if head.transfer_encoding is not None:
            self._frame(head)
        elif head.content_length_field is not None:
            head.content_length = int(head.content_length_field)  # llhttp checked the digits
        else:
            unframed = True
        if self.phase is _HEAD:
            self.phase = _IDLE
        if status < 200 and status != 101:
            head.interim = True
            self._on_head(head)
            return end  # RFC 9110 15.2: the final response is still to come
        methods = self.methods
        head.method = method = methods.popleft() if methods else ""
        if upgrade or status == 101 or (method == "CONNECT" and status < 300):
            head.upgraded = True
            self._on_head(head)
            if self._on_end is not None:
                self._on_end(head, 0)
            self.move(_TUNNEL)
            if self._on_tunnel is not None:
                self._on_tunnel(data[end:])
            return len(data)
        no_body = method == "HEAD" or status == 204 or status == 304
        if unframed and not self._done and not no_body:
            head.keep_alive = keep_alive = False  # RFC 9112 6.3: no length, the body ends at close
        self._on_head(head)
        if self._done:
            if self._on_end is not None:
                self._on_end(head, 0)
            if not keep_alive:
                self.move(_CLOSED)
        elif no_body:
            self.parser = self._new_parser()  # llhttp expected the body its fields announce
            self._message_end()
        else:
            cl = head.content_length
            if 0 <= cl <= len(data) - end and not head.chunked:
                return self._whole_body(data, end, cl, head)
            self._framing(head)
        return end

    def _message_end(self) -> None:
        head = self.head
        self._end_callback(head)
        if self.phase is _BODY:
            self.move(_IDLE)
        if not head.keep_alive and self.phase is _IDLE:
            self.move(_CLOSED)

    def _end_callback(self, head: ResponseHead) -> None:
        if self._on_end is not None:
            self._on_end(head, self.body_bytes)


def _keep_alive(version: str, connection: bytes) -> bool:
    """RFC 9112 9.3: HTTP/1.1 persists unless `close` is named; HTTP/1.0 only if `keep-alive` is."""
    if not connection:
        return version == "1.1"
    tokens = [t.strip() for t in connection.split(b",")]
    return b"close" not in tokens and (version == "1.1" or b"keep-alive" in tokens)


def _absolute(target: bytes) -> tuple[str, str]:
    """(path without query, authority) of an absolute-form target, or (target, '') for anything else.

    RFC 3986 3.2: the authority ends at the first '/', '?' or '#'."""
    text = target.decode("latin-1")
    scheme_end = text.find("://")
    if scheme_end < 0:
        return text, ""
    rest = text[scheme_end + 3:]
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    path = rest[cut:] or "/"
    if path[0] != "/":
        path = "/" + path if path[0] != "?" else "/"
    q = path.find("?")
    return (path if q < 0 else path[:q]), rest[:cut]

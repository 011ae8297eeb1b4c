"""HTTP/2 seen from the wire (the tap): the frames of one cleartext connection, one `H2Exchange` per stream.

Fed each direction's bytes in order (RFC 9113): the client preface, then frames. The HPACK
dynamic table is followed per direction with the `hpack` package's Decoder, its size bounded
as the receiving side announced it (SETTINGS_HEADER_TABLE_SIZE); frame sizes as announced
(SETTINGS_MAX_FRAME_SIZE). HPACK is a chain: a header block that cannot be decoded, or bytes
lost to a gap, leave every later block undecodable. The tracker then gives up (`undecoded`
says why), ends the streams open as incomplete, and guesses nothing after: the tap records the
connection once as `h2` with that reason. No I/O and no clock: every entry point takes the
time (ns) of its bytes.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from urllib.parse import unquote

from hpack import Decoder, HPACKError

from meshlens.protocols.errors import LocalError
from meshlens.protocols.exchange import Exchange
from meshlens.protocols.sniff import H2_PREFACE

__all__ = ["ERROR_CODES", "H2Exchange", "H2Tracker", "MAX_HEADER_BLOCK_BYTES", "MAX_HEADER_LIST_BYTES",
           "MAX_HPACK_TABLE_BYTES", "MAX_TRACKED_STREAMS", "MEMO_BLOCKS", "MEMO_BLOCK_BYTES", "State",
           "looks_like_h2"]

# Limits. A passive observer refuses nothing on the wire: past a limit it stops following
# (a stream, or the connection's HPACK chain) and says so, so its memory stays bounded.
#
# Decoded header list of one block: Envoy's max_request_headers_kb default, 60 KiB (nginx's
# large_client_header_buffers 4 x 8k is smaller; Envoy is what a mesh runs). Checked by the
# hpack Decoder while it decodes, so an HPACK bomb (a few bytes indexing a 4 KiB table entry
# again and again) is refused when the decoded size passes the limit, not after.
MAX_HEADER_LIST_BYTES = 60 * 1024
# Encoded header block (HEADERS + CONTINUATION): the same bound; also ends a CONTINUATION
# flood (CVE-2024-27316, which nginx and Envoy bound the same way).
MAX_HEADER_BLOCK_BYTES = 60 * 1024
# Streams open at once. Envoy's max_concurrent_streams default (2147483647) is no bound; nginx's
# http2_max_concurrent_streams is 128. The server enforces its own limit and an observer cannot
# refuse a stream, so the bound is 8 x nginx's, room for servers configured above it; past it
# the oldest open stream is ended as `untracked` (its call says so) and HPACK decoding goes on.
MAX_TRACKED_STREAMS = 8 * 128
# The HPACK table a side may announce is followed up to this size: Envoy's hpack_table_size and
# nginx's are 4096; an encoder that grows its table past 16x that is given up on.
MAX_HPACK_TABLE_BYTES = 16 * 4096
# Header blocks decoded since their side's HPACK table last changed, kept by their bytes with what
# they decoded to: while the table stays the same, the same bytes decode the same (a client's
# repeated request, indexed fields only, is 11 us in hpack and a dict lookup here). The memo is
# emptied when the table changes; it keeps no block longer than this, nor more than this many
# (16 x 1 KiB, and their fields: values that are the table's own or the blocks' literals).
MEMO_BLOCKS = 16
MEMO_BLOCK_BYTES = 1024

_DEFAULT_TABLE_SIZE = 4096  # RFC 9113 6.5.2
_DEFAULT_MAX_FRAME = 16_384
_LARGEST_MAX_FRAME = (1 << 24) - 1
_HEADER = struct.Struct("!IBI")  # (length << 8 | type, flags, R bit + stream id): 9 bytes

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# frame type -> (on stream 0?, fixed payload length or None)
_SHAPE = {DATA: (False, None), HEADERS: (False, None), PRIORITY: (False, 5), RST_STREAM: (False, 4),
          SETTINGS: (True, None), PUSH_PROMISE: (False, None), PING: (True, 8), GOAWAY: (True, None),
          WINDOW_UPDATE: (None, 4), CONTINUATION: (False, None)}

# RFC 9113 section 7
ERROR_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
               "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
               "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")


def _code_name(code: int) -> str:
    return ERROR_CODES[code] if code < len(ERROR_CODES) else f"0x{code:x}"


@dataclass(slots=True, eq=True)
class H2Exchange(Exchange):
    """One stream: its request, response and trailers. `version` is '2'."""

    stream_id: int = 0
    content_type: str = ""
    """The request's content-type (else the response's)."""
    grpc_status: int = -1
    """From the trailers (or a trailers-only response); -1 when none was seen."""
    grpc_message: str = ""
    """grpc-message, percent-decoded."""
    reset_by: str = ""
    """'client' or 'server' when a RST_STREAM ended the stream."""
    reset_code: str = ""
    """The RST_STREAM (or GOAWAY) error code's name."""

    @property
    def grpc(self) -> bool:
        return self.content_type.startswith("application/grpc")


class State(enum.Enum):
    """The connection."""

    __hash__ = object.__hash__

    PREFACE = "preface"
    FRAMES = "frames"
    UNDECODED = "undecoded"
    CLOSED = "closed"


# Rules: PREFACE -> FRAMES once the client's preface is read; PREFACE or FRAMES -> UNDECODED
# when the tracker gives up; any -> CLOSED on close(). Nothing leaves CLOSED.
_STATES: dict[State, frozenset[State]] = {
    State.PREFACE: frozenset({State.FRAMES, State.UNDECODED, State.CLOSED}),
    State.FRAMES: frozenset({State.UNDECODED, State.CLOSED}),
    State.UNDECODED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class _GiveUp(Exception):
    """Internal: the connection cannot be followed further (the message is the reason)."""


class _Side:
    """One direction's reader: its buffer, the frame being skipped, its header block, its HPACK table."""

    __slots__ = ("client", "buf", "buf_t", "skip", "skip_stream", "skip_end", "block", "block_stream",
                 "block_end", "block_promise", "block_t", "decoder", "max_frame", "memo", "memo_top", "memo_shape")

    def __init__(self, client: bool) -> None:
        self.client = client
        self.buf = bytearray()
        self.buf_t = 0  # time of the first byte in buf
        self.skip = 0  # payload bytes of the current frame still to pass unbuffered
        self.skip_stream: _Stream | None = None
        self.skip_end = False  # END_STREAM of the DATA frame being skipped
        self.block: bytearray | None = None  # a header block waiting for CONTINUATION
        self.block_stream = 0
        self.block_end = False
        self.block_promise = 0  # promised stream id when the block is a PUSH_PROMISE's
        self.block_t = 0  # when the block's first frame began
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST_BYTES)
        self.decoder.max_allowed_table_size = _DEFAULT_TABLE_SIZE
        self.max_frame = _DEFAULT_MAX_FRAME  # as the other side announced
        self.memo: dict[bytes, dict[bytes, bytes]] = {}  # see MEMO_BLOCKS
        # the table the memo holds for: its newest entry (the object: an entry added is a new one), and
        # (entries, size, allowed size)
        self.memo_top: tuple[bytes, bytes] | None = None
        self.memo_shape = (0, _DEFAULT_TABLE_SIZE, _DEFAULT_TABLE_SIZE)

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        """The block's fields (the first of each name), from the memo while the table is as it was;
        hpack's errors raised."""
        decoder = self.decoder
        table = decoder.header_table
        entries = table.dynamic_entries
        top = entries[0] if entries else None
        shape = (len(entries), table.maxsize, decoder.max_allowed_table_size)
        memo = self.memo
        if top is not self.memo_top or shape != self.memo_shape:
            memo.clear()
            self.memo_top, self.memo_shape = top, shape
        else:
            headers = memo.get(block)
            if headers is not None:
                return headers
        headers = dict(reversed(decoder.decode(block, raw=True)))
        if len(block) <= MEMO_BLOCK_BYTES and len(memo) < MEMO_BLOCKS:
            memo[block] = headers  # (a block that changed the table empties the memo at the next one)
        return headers


class _Stream:
    __slots__ = ("ex", "final")

    def __init__(self, ex: H2Exchange) -> None:
        self.ex = ex
        self.final = False  # the final response head was read: the next HEADERS are trailers


def looks_like_h2(data: bytes) -> bool:
    """Whether `data` (the first bytes seen of a direction, capture begun mid-connection) is whole
    HTTP/2 frames: each header well formed for its type, the last ending where `data` ends."""
    i, n, frames = 0, len(data), 0
    while i + 9 <= n:
        word, _flags, sid = _HEADER.unpack_from(data, i)
        length, ftype = word >> 8, word & 0xFF
        shape = _SHAPE.get(ftype)
        if shape is None or sid >> 31 or length > _DEFAULT_MAX_FRAME:
            return False
        on_zero, fixed = shape
        if (on_zero is True and sid) or (on_zero is False and not sid) or (fixed is not None and length != fixed):
            return False
        i += 9 + length
        frames += 1
    return frames > 0 and i == n


class H2Tracker:
    """Follows one h2c connection and emits an `H2Exchange` per stream as it ends.

    Feed each direction's bytes in the order they were seen, with their time; each call returns
    the exchanges it ended. It never raises on what the peers sent: what it cannot follow makes
    it give up (`state` UNDECODED, `undecoded` the reason); driving it after close() is a bug
    (`LocalError`).
    """

    def __init__(self, *, midstream: bool = False) -> None:
        """`midstream`: the capture began inside the connection, so HPACK cannot be followed."""
        # per connection
        self.state = State.PREFACE
        self.undecoded = ""
        self.peer_error = False  # the peers broke the protocol or passed a limit (not a capture's loss)
        self.client = _Side(True)
        self.server = _Side(False)
        self.events: list[H2Exchange] = []  # of the current call
        self.streams: dict[int, _Stream] = {}  # open streams, oldest first
        self.highest = {True: 0, False: 0}  # highest stream id each side (client?) opened
        self.opened = 0  # streams opened
        self.goaway = ""  # 'client CODE' or 'server CODE' once a GOAWAY was seen
        self._preface = 0  # client preface bytes read
        if midstream:
            self._give_up("capture started mid-connection", 0, "")

    def __repr__(self) -> str:
        return f"<H2Tracker state={self.state.name} streams={len(self.streams)} undecoded={self.undecoded!r}>"

    @property
    def buffered(self) -> int:
        """Bytes this tracker holds (frames being read, header blocks waiting for CONTINUATION)."""
        return sum(len(s.buf) + len(s.block or b"") for s in (self.client, self.server))

    def _move(self, new: State) -> None:
        if new not in _STATES[self.state]:
            raise LocalError(f"H2Tracker: no transition {self.state.name} -> {new.name}")
        self.state = new

    # -- entry points ---------------------------------------------------------------------

    def feed_request(self, data: bytes, t_ns: int) -> list[H2Exchange]:
        """Client-to-server bytes, received at `t_ns`."""
        return self._feed(self.client, data, t_ns)

    def feed_response(self, data: bytes, t_ns: int) -> list[H2Exchange]:
        """Server-to-client bytes, received at `t_ns`."""
        return self._feed(self.server, data, t_ns)

    def gap(self, direction: str, nbytes: int, t_ns: int) -> list[H2Exchange]:
        """`nbytes` of `direction` ('request' or 'response') were lost: the HPACK chain is broken."""
        events = self._begin("gap")
        if self.state is not State.UNDECODED:
            self._give_up(f"{nbytes} {direction} bytes lost to a capture gap: HPACK state unknown", t_ns, "gap")
        return events

    def close(self, t_ns: int, error: str = "closed") -> list[H2Exchange]:
        """The connection is gone (FIN, reset, idle expiry, end of capture): open streams end as `error`."""
        if self.state is State.CLOSED:
            self.events = []
            return self.events
        events = self._begin("close")
        self._end_all(t_ns, error)
        self._move(State.CLOSED)
        return events

    # -- frames ---------------------------------------------------------------------------

    def _begin(self, what: str) -> list[H2Exchange]:
        if self.state is State.CLOSED:
            raise LocalError(f"H2Tracker.{what}() in state CLOSED")
        self.events = []
        return self.events

    def _feed(self, side: _Side, data: bytes, t: int) -> list[H2Exchange]:
        events = self._begin("feed_request" if side.client else "feed_response")
        if self.state is State.UNDECODED or not data:
            return events
        try:
            if side.client and self.state is State.PREFACE:
                at = self._preface
                head = bytes(data[:len(H2_PREFACE) - at])
                if H2_PREFACE[at:at + len(head)] != head:
                    raise _GiveUp("no client connection preface")
                self._preface += len(head)
                data = data[len(head):]
                if self._preface < len(H2_PREFACE):
                    return events
                self._move(State.FRAMES)
            self._frames(side, data, t)
        except _GiveUp as e:
            self.peer_error = True
            self._give_up(str(e), t)
        return events

    def _frames(self, side: _Side, data: bytes, t: int) -> None:
        pos = 0
        if side.skip:  # the rest of a DATA (or unknown) frame's payload, counted, not kept
            pos = min(side.skip, len(data))
            side.skip -= pos
            if not side.skip:
                self._data_end(side, t)
        buf = side.buf
        if pos < len(data):
            if not buf:
                side.buf_t = t
            buf += data[pos:]
        while len(buf) >= 9 and not side.skip:
            word, flags, sid = _HEADER.unpack_from(buf)
            length, ftype, sid = word >> 8, word & 0xFF, sid & 0x7FFFFFFF
            if length > side.max_frame:
                raise _GiveUp(f"FRAME_SIZE_ERROR: a frame of {length} bytes, above SETTINGS_MAX_FRAME_SIZE "
                              f"{side.max_frame}")
            if side.block is not None and (ftype != CONTINUATION or sid != side.block_stream):
                raise _GiveUp("PROTOCOL_ERROR: a frame other than CONTINUATION inside a header block")
            shape = _SHAPE.get(ftype)
            if shape is not None:
                on_zero, fixed = shape
                if (on_zero is True and sid) or (on_zero is False and not sid):
                    raise _GiveUp(f"PROTOCOL_ERROR: frame type {ftype} on stream {sid}")
                if fixed is not None and length != fixed:
                    raise _GiveUp(f"FRAME_SIZE_ERROR: frame type {ftype} of length {length}")
            if ftype == DATA or shape is None:  # streamed: only the pad length is read
                need = 1 if ftype == DATA and flags & _PADDED else 0
                if len(buf) < 9 + need:
                    return
                if ftype == DATA:
                    pad = buf[9] if need else 0
                    if need and pad >= length:
                        raise _GiveUp("PROTOCOL_ERROR: DATA padding longer than its payload")
                    self._data(side, sid, length - need - pad, bool(flags & _END_STREAM))
                take = min(length - need, len(buf) - 9 - need)
                side.skip = length - need - take
                del buf[:9 + need + take]
                if not side.skip:
                    self._data_end(side, t)
            else:
                if length > MAX_HEADER_BLOCK_BYTES:
                    raise _GiveUp(f"a frame of type {ftype} of {length} bytes, above MAX_HEADER_BLOCK_BYTES "
                                  f"{MAX_HEADER_BLOCK_BYTES}")
                if len(buf) < 9 + length:
                    return
                payload = bytes(buf[9:9 + length])
                t0 = side.buf_t
                del buf[:9 + length]
                self._frame(side, ftype, flags, sid, payload, t0, t)
            side.buf_t = t

    def _frame(self, side: _Side, ftype: int, flags: int, sid: int, p: bytes, t0: int, t: int) -> None:
        if ftype == HEADERS or ftype == PUSH_PROMISE:
            if flags & _PADDED:
                if not p or p[0] >= len(p):
                    raise _GiveUp("PROTOCOL_ERROR: padding longer than the frame")
                p = p[1:len(p) - p[0]]
            promised = 0
            if ftype == PUSH_PROMISE:
                if side.client or len(p) < 4:
                    raise _GiveUp("PROTOCOL_ERROR: a PUSH_PROMISE from the client, or too short")
                promised, p = int.from_bytes(p[:4], "big") & 0x7FFFFFFF, p[4:]
            elif flags & _PRIORITY_FLAG:
                if len(p) < 5:
                    raise _GiveUp("FRAME_SIZE_ERROR: HEADERS too short for its priority")
                p = p[5:]
            side.block, side.block_stream, side.block_promise = bytearray(p), sid, promised
            side.block_end = ftype == HEADERS and bool(flags & _END_STREAM)
            side.block_t = t0
            if flags & _END_HEADERS:
                self._block_done(side, t)
        elif ftype == CONTINUATION:
            if side.block is None:
                raise _GiveUp("PROTOCOL_ERROR: CONTINUATION without HEADERS")
            side.block += p
            if len(side.block) > MAX_HEADER_BLOCK_BYTES:
                raise _GiveUp(f"header block above MAX_HEADER_BLOCK_BYTES {MAX_HEADER_BLOCK_BYTES} (CONTINUATION flood)")
            if flags & _END_HEADERS:
                self._block_done(side, t)
        elif ftype == RST_STREAM:
            stream = self.streams.get(sid)
            if stream is not None:
                ex = stream.ex
                ex.reset_by = "client" if side.client else "server"
                ex.reset_code = _code_name(int.from_bytes(p, "big"))
                ex.incomplete, ex.error = True, "reset"
                self._finish(stream, t)
        elif ftype == SETTINGS:
            if flags & _ACK:
                if p:
                    raise _GiveUp("FRAME_SIZE_ERROR: SETTINGS ACK with a payload")
                return
            if len(p) % 6:
                raise _GiveUp(f"FRAME_SIZE_ERROR: SETTINGS of length {len(p)}")
            other = self.server if side.client else self.client  # whose sending the values bound
            for i in range(0, len(p), 6):
                key, value = struct.unpack_from("!HI", p, i)
                if key == 0x1:  # SETTINGS_HEADER_TABLE_SIZE: the table the other side's encoder may use
                    other.decoder.max_allowed_table_size = min(value, MAX_HPACK_TABLE_BYTES)
                elif key == 0x5:  # SETTINGS_MAX_FRAME_SIZE
                    if not _DEFAULT_MAX_FRAME <= value <= _LARGEST_MAX_FRAME:
                        raise _GiveUp(f"PROTOCOL_ERROR: SETTINGS_MAX_FRAME_SIZE {value}")
                    other.max_frame = value
        elif ftype == GOAWAY:
            if len(p) < 8:
                raise _GiveUp(f"FRAME_SIZE_ERROR: GOAWAY of length {len(p)}")
            last = int.from_bytes(p[:4], "big") & 0x7FFFFFFF
            code = _code_name(int.from_bytes(p[4:8], "big"))
            self.goaway = f"{'client' if side.client else 'server'} {code}"
            for stream in list(self.streams.values()):  # streams the sender will not process
                ex = stream.ex
                if ex.stream_id > last and (ex.stream_id % 2 == 1) != side.client:
                    ex.incomplete, ex.error, ex.reset_code = True, "goaway", code
                    self._finish(stream, t)
        # PING, WINDOW_UPDATE, PRIORITY: nothing a call records

    def _data(self, side: _Side, sid: int, body: int, end: bool) -> None:
        stream = self.streams.get(sid)
        side.skip_stream, side.skip_end = stream, end
        if stream is not None:
            if side.client:
                stream.ex.request_body_bytes += body
            else:
                stream.ex.response_body_bytes += body

    def _data_end(self, side: _Side, t: int) -> None:
        stream, side.skip_stream = side.skip_stream, None
        # the response's end is the stream's (the request's end changes nothing a call records)
        if stream is not None and side.skip_end and not side.client and stream.ex.stream_id in self.streams:
            self._finish(stream, t)

    # -- header blocks --------------------------------------------------------------------

    def _block_done(self, side: _Side, t: int) -> None:
        block, side.block = bytes(side.block or b""), None
        sid, promised, end = side.block_stream, side.block_promise, side.block_end
        try:
            headers = side.decode(block)
        except HPACKError as e:
            if "larger than" in str(e):
                raise _GiveUp(f"header list above MAX_HEADER_LIST_BYTES {MAX_HEADER_LIST_BYTES} "
                              "(Envoy's max_request_headers_kb 60)") from None
            raise _GiveUp(f"COMPRESSION_ERROR: {type(e).__name__}: {e}") from None
        except (ValueError, IndexError, UnicodeDecodeError) as e:  # what hpack 4 lets through on garbage
            raise _GiveUp(f"COMPRESSION_ERROR: {type(e).__name__}") from None
        if promised:
            self._open(promised, headers, side.block_t, client=False)
            return
        if side.client:  # a request head opens a stream; request trailers (or a closed stream's) add nothing
            if sid not in self.streams:
                if sid % 2 == 0:
                    raise _GiveUp(f"PROTOCOL_ERROR: client stream id {sid} is even")
                if sid > self.highest[True]:
                    self._open(sid, headers, side.block_t, client=True)
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # a stream already ended (reset, untracked) or never opened
        ex = stream.ex
        status = headers.get(b":status")
        if status is not None and not stream.final:
            code = int(status) if status.isdigit() and len(status) == 3 else 0
            if not ex.response_start_ns:
                ex.response_start_ns = t
            if not 100 <= code < 200:
                stream.final, ex.status = True, code
                if not ex.content_type:
                    ex.content_type = headers.get(b"content-type", b"").decode("latin-1")
        grpc_status = headers.get(b"grpc-status")
        if grpc_status is not None:  # trailers, or a trailers-only response
            ex.grpc_status = int(grpc_status) if grpc_status.isdigit() and len(grpc_status) <= 4 else -1
            ex.grpc_message = unquote(headers.get(b"grpc-message", b"").decode("latin-1"), errors="replace")
        if end:
            self._finish(stream, t)

    def _open(self, sid: int, headers: dict[bytes, bytes], t0: int, *, client: bool) -> None:
        self.highest[client] = max(self.highest[client], sid)
        if len(self.streams) >= MAX_TRACKED_STREAMS:
            oldest = next(iter(self.streams.values()))
            oldest.ex.incomplete, oldest.ex.error = True, "untracked"
            self._finish(oldest, t0)
        get = headers.get
        text = lambda name: get(name, b"").decode("latin-1")  # noqa: E731
        ex = H2Exchange(request_start_ns=t0, method=text(b":method"), path=text(b":path").partition("?")[0],
                        authority=text(b":authority") or text(b"host"), version="2", stream_id=sid,
                        content_type=text(b"content-type"))
        for name, attr in ((b"traceparent", "traceparent"), (b"tracestate", "tracestate"),
                           (b"x-request-id", "x_request_id")):
            if name in headers:
                setattr(ex, attr, text(name))
        self.streams[sid] = _Stream(ex)
        self.opened += 1

    # -- endings --------------------------------------------------------------------------

    def _finish(self, stream: _Stream, t: int) -> None:
        stream.ex.response_end_ns = t
        del self.streams[stream.ex.stream_id]
        self.events.append(stream.ex)

    def _end_all(self, t: int, error: str) -> None:
        for stream in list(self.streams.values()):
            stream.ex.incomplete = True
            stream.ex.error = stream.ex.error or error
            self._finish(stream, t)

    def _give_up(self, reason: str, t: int, error: str = "protocol_error") -> None:
        self.undecoded = reason
        self._end_all(t, error)
        for side in (self.client, self.server):
            side.buf, side.block, side.skip, side.skip_stream = bytearray(), None, 0, None
        self._move(State.UNDECODED)

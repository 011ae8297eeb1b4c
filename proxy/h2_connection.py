"""The HTTP/2 connection state both sides of the sidecar use: the `h2` library's, with its limits and GOAWAY.

`h2` (with `hpack`) frames, decodes and checks HTTP/2 as RFC 9113 says; it does no I/O.
Two things it does not do the way a proxy needs:

- A GOAWAY received closes h2's whole connection state at once (RECV_GOAWAY -> CLOSED), so
  the streams in flight, which RFC 9113 6.8 says go on to their end, could not be answered.
  `Connection` reports a received GOAWAY as the same `ConnectionTerminated` event without
  closing; the shells stop opening streams and close once the last one ends.
- Sending GOAWAY through h2 closes it the same way, so a graceful drain writes its own
  GOAWAY frame (`goaway`) and refuses streams above it (REFUSED_STREAM, safe to retry).

The limits, each named with the value it takes after:
"""
from __future__ import annotations

from collections import deque

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

__all__ = ["CONNECTION_WINDOW", "MAX_CONCURRENT_STREAMS", "MAX_HEADER_LIST_BYTES", "STREAM_WINDOW",
           "Connection", "goaway"]

# Streams a client may have open at once: nginx's http2_max_concurrent_streams (128).
MAX_CONCURRENT_STREAMS = 128
# Decoded header list of one message: Envoy's max_request_headers_kb (60 KiB); HPACK decodes against it as it
# grows, so a bomb (a small block naming a big table entry many times) is refused before it is built.
MAX_HEADER_LIST_BYTES = 60 * 1024
# Flow-control windows we grant: what one stream, and one connection, may have in flight towards us before we
# read on. A stream is acknowledged as its bytes are passed on, so a slow reader on the other side stops the
# sender at this much per stream (gRPC's own servers start at 64 KiB and grow by BDP probing; Envoy's default
# stream window is 256 MiB, which would let one stream buffer that much here).
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 8 * 1024 * 1024

_SERVER = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                          validate_outbound_headers=False, normalize_outbound_headers=False)
_CLIENT = H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True,
                          validate_outbound_headers=False, normalize_outbound_headers=False)


class Connection(H2Connection):
    """h2's connection, for one side, with the sidecar's settings; a GOAWAY received leaves streams open."""

    def __init__(self, client_side: bool) -> None:
        super().__init__(config=_CLIENT if client_side else _SERVER)
        self.local_settings = type(self.local_settings)(client=client_side, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.ENABLE_PUSH: 0,
        })
        self.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES
        self.goaway_received: int | None = None
        """The last stream id a peer's GOAWAY said it will process; None: none received."""

    def start(self) -> None:
        """The preface (client) or SETTINGS (server), and the connection window opened to CONNECTION_WINDOW."""
        self.initiate_connection()
        self.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def send_within_window(self, stream_id: int, out: deque[bytes]) -> int:
        """DATA from `out` (taken off it) as far as the stream's and the connection's windows allow, in frames
        of at most the peer's frame size; returns the bytes sent. What is left waits for a WINDOW_UPDATE."""
        sent = 0
        while out:
            window = min(self.local_flow_control_window(stream_id), self.max_outbound_frame_size)
            if window <= 0:
                break
            data = out.popleft()
            if len(data) > window:
                out.appendleft(data[window:])
                data = data[:window]
            self.send_data(stream_id, data)
            sent += len(data)
        return sent

    def _receive_goaway_frame(self, frame: GoAwayFrame):  # type: ignore[no-untyped-def,override]
        event = ConnectionTerminated()
        event.error_code = _code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        self.goaway_received = frame.last_stream_id
        return [], [event]


def _code(value: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(value)
    except ValueError:
        return value


def goaway(last_stream_id: int, code: ErrorCodes = ErrorCodes.NO_ERROR, debug: bytes = b"") -> bytes:
    """A GOAWAY frame's bytes, written beside h2's state (which would close at it, see above)."""
    frame = GoAwayFrame(0)
    frame.last_stream_id, frame.error_code, frame.additional_data = last_stream_id, int(code), debug
    return frame.serialize()

"""What the HTTP/1.1 tracker (the tap's observer) emits: one `Exchange` record per
request/response pair, and a tunnel's opening and close."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["Event", "Exchange", "TunnelClosed", "TunnelOpened"]


@dataclass(slots=True, eq=True)
class Exchange:
    """One request/response pair as this connection carried it. Emitted once, then not changed."""

    request_start_ns: int
    """Time of the first request byte; for a lost request, the time of the gap; 0 when a response had no request."""
    method: str = ""
    """Request method; '' when the request was lost to a gap or never seen."""
    path: str = ""
    """Request target without query; '' for CONNECT (see authority)."""
    authority: str = ""
    """Host header, else the authority of an absolute-form or CONNECT target."""
    version: str = ""
    """'1.1' or '1.0', from the request (else the response)."""
    status: int = 0
    """Final status; 0 when no final response was seen."""
    request_body_bytes: int = 0
    """Request body bytes after transfer decoding."""
    response_body_bytes: int = 0
    """Response body bytes after transfer decoding (gap bytes included)."""
    response_start_ns: int = 0
    """Time of the first response byte, interim 1xx included; 0 when none."""
    response_end_ns: int = 0
    """Time of the last response byte (or of the event that ended the exchange)."""
    traceparent: str | None = None
    tracestate: str | None = None
    x_request_id: str | None = None
    upgraded: bool = False
    """The connection became a tunnel after this exchange (101, or 2xx to CONNECT)."""
    incomplete: bool = False
    """Bytes were lost, cut short or malformed: sizes and times are lower bounds."""
    error: str = ""
    """'' or why it is incomplete: gap, truncated, no_response, protocol_error, closed."""

    @property
    def duration_ns(self) -> int:
        """First request byte to last response byte."""
        return max(0, self.response_end_ns - self.request_start_ns) if self.request_start_ns else 0


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    """After a 101 or a 2xx to CONNECT: from here on bytes are only counted."""

    t_ns: int


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """The tunnel ended (response EOF or close): its bytes each way."""

    request_bytes: int
    response_bytes: int
    start_ns: int
    end_ns: int


Event = Union[Exchange, TunnelOpened, TunnelClosed]

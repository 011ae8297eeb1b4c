"""Mirroring: a copy of a request sent to another destination, its answer read and thrown away.

A VirtualService rule's `mirror` (with `mirrorPercentage`, 100 % when absent, as Istio)
sends each chosen request, once it is complete, to an endpoint of the mirror's service
(and subset), as Envoy's request mirror policy does: fire and forget, the authority
with `-shadow` appended to its host (`payment-service-shadow`, a port kept after it),
never retried, never waited for, its answer discarded. A request whose body outgrew the
replay buffer is not mirrored (its copy is gone). At most `MAX_MIRRORS` are in flight;
past that a copy is dropped and counted (`mirror_dropped`).

The copy goes in the protocol the mirror's service speaks, chosen as for the request
itself (proxy/downstream.py, h2_downstream.py): HTTP/2 when it is declared `grpc` or
`http2`, or when the request came as HTTP/2 and the service is not declared `http`; one
stream on a connection of its own, with prior knowledge (`shadow_fields`). Otherwise
HTTP/1.1 with `connection: close` (`shadow_head`).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Callable

from h2.events import ConnectionTerminated, DataReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError

from meshlens.proxy.connect import open_connection
from meshlens.proxy.h2_connection import Connection

if TYPE_CHECKING:
    from meshlens.proxy.h2_fields import Fields

__all__ = ["MAX_MIRRORS", "MIRROR_TIMEOUT", "Mirrors", "shadow_authority", "shadow_fields", "shadow_head"]

log = logging.getLogger("meshlens.proxy")

MAX_MIRRORS = 64
# A mirrored request's answer is read (and dropped) for at most this long.
MIRROR_TIMEOUT = 10.0
_NOT_COPIED = (b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"traceparent",
               b"x-meshlens-peer")


def shadow_authority(authority: str) -> bytes:
    """`host:port` -> `host-shadow:port`, as Envoy names a mirror's authority."""
    host, sep, port = authority.rpartition(":") if not authority.endswith("]") else ("", "", "")
    if not sep or not port.isdigit():
        host, sep, port = authority, "", ""
    return f"{host}-shadow{sep}{port}".encode("latin-1")


def shadow_head(raw: bytes, authority: str, added: bytes) -> bytes:
    """The HTTP/1.1 head for the copy, from a head's text `raw`: Host the shadow of `authority` (a request's, or an
    absolute-form's, for an explicit proxy request), `connection: close`, hop-by-hop fields out; `added` (trace
    context) at the end."""
    lines = raw.split(b"\r\n")
    out = [lines[0], b"host: " + shadow_authority(authority)]
    for line in lines[1:]:
        if line and line.partition(b":")[0].strip().lower() not in _NOT_COPIED:
            out.append(line)
    return b"\r\n".join(out) + b"\r\nconnection: close\r\n" + added + b"\r\n"


def shadow_fields(fields: Fields) -> Fields:
    """An HTTP/2 request's fields for the copy: its :authority the shadow's."""
    return [(n, shadow_authority(v.decode("latin-1")) if n == b":authority" else v) for n, v in fields]


class _Drain(asyncio.Protocol):
    """Writes a mirrored HTTP/1.1 request, reads its answer and drops it; done when the upstream closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.data)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _H2Drain(_Drain):
    """Sends a mirrored request as one HTTP/2 stream (its body within the windows the server grants), reads its
    answer away (acknowledging it, so a big one does not stall) and closes at the stream's end or reset."""

    def __init__(self, fields: Fields, body: bytes) -> None:
        super().__init__(b"")
        self.h2 = Connection(client_side=True)
        self.fields = fields
        self.out = deque([body]) if body else deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        h2 = self.h2
        h2.start()
        h2.send_headers(1, self.fields, end_stream=not self.out)
        self._flush()

    def _flush(self) -> None:
        h2 = self.h2
        if self.out:
            h2.send_within_window(1, self.out)
            if not self.out:
                h2.end_stream(1)
        assert self.transport is not None
        self.transport.write(h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.transport.abort()
            return
        for e in events:
            if isinstance(e, DataReceived):
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, (StreamEnded, StreamReset, ConnectionTerminated)):
                self.transport.write(self.h2.data_to_send())
                self.transport.close()
                return
        self._flush()


class Mirrors:
    """The copies in flight (per process)."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        for name in ("mirror_sent", "mirror_dropped", "mirror_failed"):
            stats.setdefault(name, 0)
        self.in_flight = 0

    def send(self, addr: tuple[str, int], data: bytes) -> bool:
        """Send an HTTP/1.1 copy, `data` (head and body), to `addr` and forget it; False when too many are in
        flight."""
        return self._start(addr, lambda: _Drain(data))

    def send_h2(self, addr: tuple[str, int], fields: Fields, body: bytes) -> bool:
        """Send an HTTP/2 copy, one stream of `fields` and `body`, to `addr` and forget it; False when too many
        are in flight."""
        return self._start(addr, lambda: _H2Drain(fields, body))

    def _start(self, addr: tuple[str, int], drain: Callable[[], _Drain]) -> bool:
        if self.in_flight >= MAX_MIRRORS:
            self.stats["mirror_dropped"] += 1
            return False
        self.in_flight += 1
        asyncio.get_running_loop().create_task(self._send(addr, drain))
        return True

    async def _send(self, addr: tuple[str, int], factory: Callable[[], _Drain]) -> None:
        try:
            drain = await open_connection(factory, addr)
        except OSError as e:
            self.stats["mirror_failed"] += 1
            log.debug("mirror to %s:%d failed: %s", addr[0], addr[1], e)
            self.in_flight -= 1
            return
        assert drain.transport is not None
        self.stats["mirror_sent"] += 1
        try:
            await asyncio.wait_for(asyncio.shield(drain.done), MIRROR_TIMEOUT)
        except asyncio.TimeoutError:
            drain.transport.abort()
        finally:
            self.in_flight -= 1

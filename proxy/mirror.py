"""Mirroring: a copy of a request sent to another destination, its answer read and thrown away.

A VirtualService rule's `mirror` (with `mirrorPercentage`, 100 % when absent, as Istio)
sends each chosen request, once it is complete, to an endpoint of the mirror's service
(and subset), as Envoy's request mirror policy does: fire and forget, the Host field
with `-shadow` appended to its host (`payment-service-shadow`, a port kept after it),
`connection: close`, never retried, never waited for, its answer discarded. A request
whose body outgrew the replay buffer is not mirrored (its copy is gone). At most
`MAX_MIRRORS` are in flight; past that a copy is dropped and counted (`mirror_dropped`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshlens.proxy.connect import open_connection

if TYPE_CHECKING:
    from meshlens.protocols.http1 import RequestHead

__all__ = ["MAX_MIRRORS", "MIRROR_TIMEOUT", "Mirrors", "shadow_head"]

log = logging.getLogger("meshlens.proxy")

MAX_MIRRORS = 64
# A mirrored request's answer is read (and dropped) for at most this long.
MIRROR_TIMEOUT = 10.0


def shadow_head(head: RequestHead, added: bytes) -> bytes:
    """The head for the copy: Host (or an absolute-form's authority, for an explicit proxy request) with
    `-shadow`, `connection: close`, hop-by-hop fields out; `added` (trace context) after the request line."""
    lines = head.raw.split(b"\r\n")
    authority = head.authority
    host, sep, port = authority.rpartition(":") if not authority.endswith("]") else ("", "", "")
    if not sep or not port.isdigit():
        host, sep, port = authority, "", ""
    shadow = f"{host}-shadow{sep}{port}".encode("latin-1")
    out = [lines[0], b"host: " + shadow]
    for line in lines[1:]:
        name = line.partition(b":")[0].strip().lower()
        if not line or name in (b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade",
                                b"traceparent", b"x-meshlens-peer"):
            continue
        out.append(line)
    return b"\r\n".join(out) + b"\r\nconnection: close\r\n" + added + b"\r\n"


class _Drain(asyncio.Protocol):
    """Reads a mirrored request's answer and drops it; done when the upstream closes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Mirrors:
    """The copies in flight (per process)."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        for name in ("mirror_sent", "mirror_dropped", "mirror_failed"):
            stats.setdefault(name, 0)
        self.in_flight = 0

    def send(self, addr: tuple[str, int], data: bytes) -> bool:
        """Send `data` (head and body) to `addr` and forget it; False when too many are in flight."""
        if self.in_flight >= MAX_MIRRORS:
            self.stats["mirror_dropped"] += 1
            return False
        self.in_flight += 1
        asyncio.get_running_loop().create_task(self._send(addr, data))
        return True

    async def _send(self, addr: tuple[str, int], data: bytes) -> None:
        try:
            drain = await open_connection(_Drain, addr)
        except OSError as e:
            self.stats["mirror_failed"] += 1
            log.debug("mirror to %s:%d failed: %s", addr[0], addr[1], e)
            self.in_flight -= 1
            return
        assert drain.transport is not None
        drain.transport.write(data)
        self.stats["mirror_sent"] += 1
        try:
            await asyncio.wait_for(asyncio.shield(drain.done), MIRROR_TIMEOUT)
        except asyncio.TimeoutError:
            drain.transport.abort()
        finally:
            self.in_flight -= 1

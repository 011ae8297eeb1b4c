"""Idle upstream connections, kept alive for the next exchange to the same address.

Most recently used first (a warm connection is the least likely to have been closed by
the upstream); each address keeps at most MAX_IDLE_PER_UPSTREAM; a connection idle
longer than its idle timeout (POOL_IDLE_TIMEOUT, or its destination's DestinationRule
`connectionPool.http.idleTimeout`, enforced) is closed when next looked at or by the sweep. A
connection the upstream closes while idle removes itself (`forget`).
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlens.proxy.upstream import Upstream

__all__ = ["MAX_IDLE_PER_UPSTREAM", "POOL_IDLE_TIMEOUT", "Pool"]

# Idle kept-alive connections per upstream address: nginx's `keepalive 32` in its docs' example.
MAX_IDLE_PER_UPSTREAM = 32
# Close pooled connections idle this long: below the 60-75 s servers use (nginx, aiohttp),
# so the proxy closes first and never writes into a connection the upstream is closing.
POOL_IDLE_TIMEOUT = 30.0


class Pool:
    """Idle upstream connections by address (per process)."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.idle: dict[tuple[str, int], deque[Upstream]] = {}
        self.stats = stats

    def __repr__(self) -> str:
        return f"<Pool idle={sum(map(len, self.idle.values()))}>"

    def take(self, addr: tuple[str, int]) -> Upstream | None:
        idle = self.idle.get(addr)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            up = idle.pop()
            if not up.closed and now - up.idle_since < (up.idle_timeout or POOL_IDLE_TIMEOUT):
                self.stats["upstream_cx_reused"] += 1
                return up
            up.close()
        return None

    def release(self, up: Upstream) -> None:
        """An upstream connection is free again: kept for the next exchange, or closed."""
        if up.closed:
            return
        idle = self.idle.get(up.addr)
        if idle is None:
            idle = self.idle[up.addr] = deque()
        if len(idle) >= MAX_IDLE_PER_UPSTREAM:
            up.close()
            return
        up.release()
        idle.append(up)

    def forget(self, up: Upstream) -> None:
        idle = self.idle.get(up.addr)
        if idle and up in idle:
            idle.remove(up)

    def sweep(self) -> None:
        """Close connections idle past POOL_IDLE_TIMEOUT (the proxy calls this about once a second)."""
        now = time.monotonic()
        for idle in self.idle.values():
            while idle and now - idle[0].idle_since >= (idle[0].idle_timeout or POOL_IDLE_TIMEOUT):
                idle.popleft().close()

    def close(self) -> None:
        for idle in self.idle.values():
            for up in list(idle):
                up.close()
        self.idle.clear()

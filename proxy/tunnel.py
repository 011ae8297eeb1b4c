"""Two transports glued into a byte tunnel: what a TCP/TLS/h2 passthrough or an upgraded HTTP connection becomes.

Each `End` is the protocol of one transport and writes what it reads to the other end.
Flow control both ways: while one end's write buffer is above its transport's high-water
mark (or it is still connecting), the other end is not read, so the proxy holds at most
a buffer's worth per direction. A half-close (EOF) is passed on as `write_eof`; the
tunnel closes once both directions ended. A reset on either end aborts the other and is
recorded as `reset`. A tunnel idle for `idle_timeout` is closed. Bytes are counted per
direction, and `watch` callbacks may look at each direction's first bytes (TLS hellos).
"""
from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Literal

__all__ = ["CLIENT", "SERVER", "End", "Tunnel", "Watch"]

CLIENT, SERVER = 0, 1
# Sees the bytes read from one end; returns True once it needs no more (then it is dropped).
Watch = Callable[[bytes], bool]
Close = Literal["", "fin", "rst", "idle", "refused", "timeout", "closed"]
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, as the peer that reset us did


class End(asyncio.Protocol):
    """One side of a tunnel: the client's connection (CLIENT) or the destination's (SERVER)."""

    __slots__ = ("tunnel", "index", "transport", "backlog", "eof_pending", "write_paused", "eof", "lost")

    def __init__(self, tunnel: Tunnel, index: int) -> None:
        self.tunnel, self.index = tunnel, index
        self.transport: asyncio.Transport | None = None
        self.backlog: list[bytes] = []  # bytes for this end sent before it was connected
        self.eof_pending = False  # the other end half-closed before this one was connected
        self.write_paused = False
        self.eof = False  # this end's peer will send no more
        self.lost = False

    def __repr__(self) -> str:
        return f"<End {'client' if self.index == CLIENT else 'server'} eof={self.eof} lost={self.lost}>"

    @property
    def other(self) -> End:
        return self.tunnel.ends[1 - self.index]

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.tunnel.closing:  # the other end went away while this one was connecting
            self.transport.abort()
            return
        if self.backlog:
            data, self.backlog = b"".join(self.backlog), []
            self.transport.write(data)
        if self.eof_pending:
            self.write_eof()
        if not self.write_paused:
            self.other.reading(True)

    def adopt(self, transport: asyncio.Transport, write_paused: bool) -> None:
        """Take over a connected transport from another protocol (Downstream, Upstream)."""
        transport.set_protocol(self)
        self.write_paused = write_paused
        self.transport = transport
        if self.backlog:  # the other end was connected first and has spoken already
            data, self.backlog = b"".join(self.backlog), []
            transport.write(data)

    def data_received(self, data: bytes) -> None:
        t = self.tunnel
        t.bytes[self.index] += len(data)
        t.last = t.loop.time()
        watch = t.watch[self.index]
        if watch is not None and watch(data):
            t.watch[self.index] = None
        self.other.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.other.write_eof()
        if self.other.eof:
            self.tunnel.close("fin")
        return True  # keep the transport open: the other direction may still be talking

    def pause_writing(self) -> None:
        self.write_paused = True
        self.other.reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.other.reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.end_lost(self, exc)

    # -- used by the other end ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        tr = self.transport
        if tr is None:
            self.backlog.append(data)
            self.other.reading(False)  # until connected: at most one read is held
        elif not tr.is_closing():
            tr.write(data)

    def write_eof(self) -> None:
        tr = self.transport
        if tr is None:
            self.eof_pending = True
        elif not tr.is_closing() and tr.can_write_eof():
            tr.write_eof()

    def reading(self, on: bool) -> None:
        """Read this end or stop; harmless when already so, or when closed."""
        tr = self.transport
        if tr is None or self.lost or tr.is_closing():
            return
        if on and not self.other.write_paused and self.other.transport is not None:
            tr.resume_reading()
        elif not on:
            tr.pause_reading()


class Tunnel:
    """A client connection and a destination connection, spliced until both directions end.

    `on_close(tunnel)` runs once, after both ends are gone; `bytes[CLIENT]` are the bytes
    the client sent (request bytes), `bytes[SERVER]` the destination's (response bytes)."""

    def __init__(self, idle_timeout: float, on_close: Callable[[Tunnel], None],
                 watch: tuple[Watch | None, Watch | None] = (None, None)) -> None:
        # per tunnel
        self.loop = asyncio.get_running_loop()
        self.ends = (End(self, CLIENT), End(self, SERVER))
        self.bytes = [0, 0]
        self.watch: list[Watch | None] = list(watch)
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.last = self.loop.time()
        self.closing = False
        self.reason: Close = ""  # why it ended: fin, rst, idle, refused, timeout, closed
        self.error = ""  # the record's error class: '', reset, refused, timeout
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(self.last + idle_timeout, self._idle)
        self.finished = False

    def __repr__(self) -> str:
        return f"<Tunnel bytes={self.bytes} closing={self.closing} reason={self.reason!r}>"

    @property
    def client(self) -> End:
        return self.ends[CLIENT]

    @property
    def server(self) -> End:
        return self.ends[SERVER]

    def send(self, index: int, data: bytes) -> None:
        """Bytes read before the tunnel existed (after an upgrade head, or sniffed): to end `index`."""
        if data:
            self.bytes[1 - index] += len(data)
            watch = self.watch[1 - index]
            if watch is not None and watch(data):
                self.watch[1 - index] = None
            self.ends[index].write(data)

    def start(self) -> None:
        """Both ends are adopted or connecting: let bytes flow where nothing blocks them."""
        for end in self.ends:
            end.reading(True)

    def close(self, reason: Close) -> None:
        """Close both ends, flushing what they hold."""
        if self.closing:
            return
        self.closing = True
        self.reason = reason
        for end in self.ends:
            if end.transport is not None and not end.lost:
                end.transport.close()
        self._maybe_finished()

    def abort(self, reason: Close, error: str) -> None:
        """Cut both ends now (a reset, a refused connect): nothing buffered is sent, the peers see RST."""
        if not self.error:
            self.error = error
        if not self.closing:
            self.closing = True
            self.reason = reason
        for end in self.ends:
            tr = end.transport
            if tr is not None and not end.lost:
                sock = tr.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass  # already gone
                tr.abort()
        self._maybe_finished()

    def connect_failed(self, error: str) -> None:
        """The destination could not be reached: the client's connection is cut."""
        self.ends[SERVER].lost = True
        self.abort("refused" if error == "refused" else "timeout", error)

    def end_lost(self, end: End, exc: Exception | None) -> None:
        if exc is not None and not self.closing:
            self.abort("rst", "reset")
        elif not self.closing:
            self.close("closed")  # closed under us (e.g. by a graceful drain): flush the other end
        else:
            self._maybe_finished()

    def _maybe_finished(self) -> None:
        # an end is gone once its connection_lost ran, or its connect failed; a connect still
        # in flight ends in one of the two (connection_made aborts it when the tunnel is closing)
        if self.finished or not (self.ends[CLIENT].lost and self.ends[SERVER].lost):
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.on_close(self)

    def _idle(self) -> None:
        self.timer = None
        if self.closing:
            return
        due = self.last + self.idle_timeout
        if self.loop.time() >= due:
            self.close("idle")
        else:
            self.timer = self.loop.call_at(due, self._idle)

"""Live capture: an AF_PACKET socket (scapy's L2ListenSocket, what `conf.L2listen` is on
Linux) with a kernel BPF filter, raw frames (no scapy dissection) into a `Tap`.

The socket sees both directions, outgoing copies included: on `lo` every packet
arrives twice, and the reassembler counts the second copy as a duplicate.
"""
from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from meshlens.tap.calls import Tap
from meshlens.tap.packets import LINKTYPE_ETHERNET, LINKTYPE_RAW

__all__ = ["CAPTURE_BUFFER_BYTES", "CaptureError", "LiveCapture", "run_live"]

# Kernel receive buffer of the capture socket: ~0.5 s of 1 Gbit/s, so a Python
# pause (GC, a batch shipped) drops nothing. tcpdump's default is 2 MiB; it is
# bounded by net.core.rmem_max unless we are root (SO_RCVBUFFORCE).
CAPTURE_BUFFER_BYTES = 64 * 1024 * 1024
# Largest frame read: GRO/TSO frames reach 64 KiB of IP plus headers.
MAX_FRAME = 262_144
# How often (wall clock) idle connections are expired when traffic is quiet.
EXPIRE_INTERVAL_S = 1.0

# ARPHRD_* (linux/if_arp.h) -> pcap link type. Loopback frames carry a zeroed
# Ethernet header; tun devices (ARPHRD_NONE) give bare IP.
_ARPHRD_LINKTYPE = {1: LINKTYPE_ETHERNET, 772: LINKTYPE_ETHERNET, 65534: LINKTYPE_RAW, 776: LINKTYPE_RAW}
_SOL_PACKET, _PACKET_STATISTICS = 263, 6
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class CaptureError(Exception):
    """The capture cannot start: no such interface, no permission, bad filter (one line)."""


class LiveCapture:
    """One interface, one AF_PACKET socket, optionally filtered in the kernel."""

    def __init__(self, iface: str, bpf: str | None = None, *, buffer_bytes: int = CAPTURE_BUFFER_BYTES) -> None:
        try:
            from scapy.arch.linux import L2ListenSocket
            from scapy.error import Scapy_Exception
        except ImportError as e:  # pragma: no cover - scapy is a dependency
            raise CaptureError(f"live capture needs scapy on Linux: {e}") from None
        if iface not in {name for _, name in socket.if_nameindex()}:
            raise CaptureError(f"no such interface: {iface}")
        self.iface = iface
        # scapy warns that it cannot pick a dissector for the link type: we dissect nothing
        logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
        try:
            self._sock = L2ListenSocket(iface=iface, filter=bpf, promisc=False)
        except PermissionError:
            raise CaptureError(f"no permission to capture on {iface} (needs root or CAP_NET_RAW)") from None
        except Scapy_Exception as e:
            raise CaptureError(str(e).removeprefix("Cannot set filter: ")) from None
        except (OSError, ValueError) as e:
            raise CaptureError(f"cannot capture on {iface}: {e}") from None
        s = self._sock.ins
        try:
            s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, buffer_bytes)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        s.setblocking(False)
        self.linktype = _ARPHRD_LINKTYPE.get(s.getsockname()[3], LINKTYPE_ETHERNET)
        self.kernel_received = 0
        self.kernel_dropped = 0

    def fileno(self) -> int:
        return self._sock.ins.fileno()

    def read_ready(self, out: list[tuple[int, bytes]], limit: int = 1024) -> None:
        """Append (t_ns, frame) for every frame waiting now (at most `limit`)."""
        recv = self._sock.recv_raw
        for _ in range(limit):
            try:
                _cls, frame, ts = recv(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            if frame is None:
                continue
            out.append((int(ts * 1e9) if ts else time.time_ns(), frame))

    def update_stats(self) -> None:
        """Kernel counters (PACKET_STATISTICS resets on read, hence the sums)."""
        try:
            packets, drops = struct.unpack("II", self._sock.ins.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
        except OSError:
            return
        self.kernel_received += packets
        self.kernel_dropped += drops

    def close(self) -> None:
        self.update_stats()
        self._sock.close()


def run_live(tap: Tap, capture: LiveCapture, stop: threading.Event, *, duration: float | None = None,
             progress: Callable[[], None] | None = None) -> None:
    """Feed `capture` into `tap` until `stop` is set (or `duration` seconds pass); then finish."""
    deadline = time.monotonic() + duration if duration else None
    next_expire = time.monotonic() + EXPIRE_INTERVAL_S
    batch: list[tuple[int, bytes]] = []
    fd, linktype, feed = capture.fileno(), capture.linktype, tap.feed
    while not stop.is_set():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            capture.read_ready(batch)
            for t_ns, frame in batch:
                feed(t_ns, linktype, frame)
            batch.clear()
        if now >= next_expire:
            next_expire = now + EXPIRE_INTERVAL_S
            tap.expire(time.time_ns())
            capture.update_stats()
            if progress is not None:
                progress()
    capture.read_ready(batch, limit=1 << 30)  # what the kernel still holds
    for t_ns, frame in batch:
        feed(t_ns, linktype, frame)
    tap.finish(time.time_ns())

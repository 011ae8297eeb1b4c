"""TCP reassembly per direction, without I/O: segments and time in, events out.

Rules, as the receiving stack applies them:

- A connection is keyed by its 4-tuple and has two directions, client to
  server (`c2s`) and back (`s2c`). The client is the sender of a SYN, the
  receiver of a SYN-ACK, or, for a connection already open when the capture
  began, the end with the higher port (servers listen on the lower one); each
  direction then starts at the first sequence number seen in it.
- Bytes are delivered in sequence order (mod 2**32, so wraparound is
  invisible). Out-of-order segments wait in a bounded buffer. Bytes already
  delivered or already buffered are never replaced: the first copy wins, as in
  the receiving kernel, so retransmissions, overlaps and the second copy of
  every packet in a loopback capture are counted once.
- A hole that will not be filled -- the buffer behind it passes its limit, the
  other end acknowledges bytes past it (the receiver got them: only the
  capture missed them), or the connection ends or idles with it -- is skipped and reported as
  `Gap(direction, nbytes)` so that the protocol parser can resynchronise.
- FIN ends a direction once every byte before it is delivered; both ended is
  `Close("fin")`. RST is `Close("rst")` at once. A SYN with a new initial
  sequence number on a live 4-tuple is a new connection (`Close("reused")` for
  the old one). Packets of a closed connection are ignored for a TIME_WAIT
  (late ACKs, retransmitted FINs).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Literal, NamedTuple

from meshlens.tap.packets import ACK, FIN, RST, SYN, TcpSegment, format_address

Direction = Literal["c2s", "s2c"]
C2S: Direction = "c2s"
S2C: Direction = "s2c"
_DIRECTIONS: tuple[Direction, Direction] = (C2S, S2C)
CloseReason = Literal["fin", "rst", "idle", "reused", "eof"]
"""`eof`: the capture ended (`close_all`) while the connection was open."""

# Out-of-order bytes buffered per direction before the hole in front of them is
# declared lost. Data can only be that far ahead of a hole if the receiver's
# window allowed it; 256 KiB covers Linux's default initial receive window
# (64 KiB) several times over, and bounds a connection to 512 KiB of buffers.
MAX_PENDING_BYTES = 256 * 1024
# Out-of-order segments buffered per direction: bounds the bookkeeping when an
# attacker (or damage) sends many tiny segments past a hole. Linux's
# out-of-order queue is similarly bounded by memory, not by count.
MAX_PENDING_SEGMENTS = 512
# A connection silent this long is closed ("idle"): Zeek's
# tcp_inactivity_timeout is 5 minutes too.
IDLE_TIMEOUT_NS = 300 * 1_000_000_000
# Both FINs seen but a hole remains: wait this long for a retransmission
# (Linux's first RTO is 1 s, TCP_RTO_MIN 200 ms) before closing with a gap.
HOLE_WAIT_NS = 3 * 1_000_000_000
# A closed 4-tuple ignores everything but a new SYN this long: Linux's
# TIME_WAIT (TCP_TIMEWAIT_LEN) is 60 s.
CLOSED_LINGER_NS = 60 * 1_000_000_000
# How often (in capture time) idle connections and TIME_WAIT entries are swept.
SWEEP_INTERVAL_NS = 1_000_000_000

_MOD = 0xFFFFFFFF
_HALF = 0x80000000


class Conn(NamedTuple):
    """A connection: its client and server ends (packed addresses)."""

    client: bytes
    client_port: int
    server: bytes
    server_port: int

    def __str__(self) -> str:
        return f"{format_address(self.client, self.client_port)} -> {format_address(self.server, self.server_port)}"


@dataclass(slots=True)
class Open:
    """A connection was first seen (`midstream`: without its SYN; its first bytes may be mid-message)."""

    conn: Conn
    t: int
    midstream: bool = False


@dataclass(slots=True)
class Data:
    """The next bytes of one direction, in order; `t` is when they became deliverable."""

    conn: Conn
    direction: Direction
    data: bytes
    t: int


@dataclass(slots=True)
class Gap:
    """`nbytes` of one direction were lost in capture; the next `Data` follows the hole."""

    conn: Conn
    direction: Direction
    nbytes: int
    t: int


@dataclass(slots=True)
class Close:
    """The connection ended; no more events for it (a later SYN on its 4-tuple is a new `Open`)."""

    conn: Conn
    reason: CloseReason
    t: int


Event = Open | Data | Gap | Close


@dataclass(slots=True)
class ReassemblyStats:
    segments: int = 0
    duplicate_bytes: int = 0
    """Bytes already delivered or buffered: retransmissions, overlaps, loopback copies."""
    gaps: int = 0
    gap_bytes: int = 0
    connections: int = 0
    ignored: int = 0
    """Segments that belong to no open connection and cannot open one (late ACK, lone RST)."""


class _Half:
    """One direction: what was delivered, what waits behind a hole, where the FIN is."""

    __slots__ = ("isn", "next_seq", "next_off", "pending", "pending_bytes", "fin_off", "done")

    def __init__(self) -> None:
        self.isn = -1  # the SYN's sequence number; -1 without a SYN
        self.next_seq = -1  # next expected sequence number; -1 before the first segment
        self.next_off = 0  # bytes delivered or skipped so far: the stream offset of next_seq
        self.pending: list[tuple[int, bytes]] = []  # (offset, bytes), sorted, non-overlapping
        self.pending_bytes = 0
        self.fin_off = -1  # stream offset of the FIN, once seen
        self.done = False  # every byte up to the FIN delivered

    def advance(self, n: int) -> None:
        self.next_off += n
        self.next_seq = (self.next_seq + n) & _MOD


class _Conn:
    __slots__ = ("conn", "halves", "last", "keys", "closed")

    def __init__(self, conn: Conn, t: int, keys: tuple[tuple, tuple]) -> None:
        self.conn = conn
        self.halves = (_Half(), _Half())
        self.last = t
        self.keys = keys
        self.closed = False


class Reassembler:
    """Every TCP connection of a capture: `feed` segments in capture order, read events."""

    def __init__(self, *, ack_gaps: bool = False) -> None:
        """`ack_gaps`: a hole the other end has acknowledged is a gap at once (as Zeek's
        "ack above hole"), instead of when the buffer fills or the connection ends. Right
        for captures on the path (data is captured before the ACK for it); wrong for
        files whose two directions were merged out of order."""
        self.ack_gaps = ack_gaps
        # Both orientations of each 4-tuple -> (connection, direction index 0=c2s, 1=s2c).
        self._table: dict[tuple, tuple[_Conn, int]] = {}
        self._closed: dict[tuple, int] = {}  # 4-tuple -> end of its TIME_WAIT
        self._next_sweep = 0
        self.stats = ReassemblyStats()

    def __len__(self) -> int:
        """Open connections."""
        return len(self._table) // 2

    def feed(self, seg: TcpSegment, t: int) -> list[Event]:
        """Events caused by one segment captured at `t` (ns)."""
        out: list[Event] = []
        self.stats.segments += 1
        if t >= self._next_sweep:
            self._sweep(t, out)
        src, dst, sport, dport, seq, ack, flags, payload = seg
        entry = self._table.get((src, sport, dst, dport))
        if entry is None:
            entry = self._open(seg, (src, sport, dst, dport), t, out)
            if entry is None:
                return out
        c, d = entry
        c.last = t
        if flags & ACK and self.ack_gaps:
            # first: the sender of this segment had received what it acknowledges
            other = c.halves[1 - d]
            if ack != other.next_seq and other.next_seq >= 0 and not other.done:
                self._acked(c, 1 - d, ack, t, out)
        if flags & (SYN | FIN | RST):
            self._control(c, d, seg, t, out)
        elif payload:
            h = c.halves[d]
            if seq == h.next_seq and not h.pending and h.fin_off < 0:
                # The common case, inlined: the next bytes, nothing waiting, no FIN yet.
                data = bytes(payload)
                h.next_off += len(data)
                h.next_seq = (seq + len(data)) & _MOD
                out.append(Data(c.conn, _DIRECTIONS[d], data, t))
            else:
                self._data(c, d, seq, payload, t, out)
        return out

    def expire(self, now: int) -> list[Event]:
        """Close connections idle at `now` (the live tap calls this when no packet comes)."""
        out: list[Event] = []
        self._sweep(now, out)
        return out

    def close_all(self, t: int) -> list[Event]:
        """End of capture: flush every connection (gaps included) and close it ("eof")."""
        out: list[Event] = []
        for c, d in list(self._table.values()):
            if d == 0 and not c.closed:
                self._close(c, "eof", t, out)
        return out

    # -- connections -------------------------------------------------------

    def _open(self, seg: TcpSegment, key: tuple, t: int, out: list[Event]) -> tuple[_Conn, int] | None:
        flags = seg.flags
        syn_only = flags & (SYN | ACK) == SYN
        rev = (seg.dst, seg.dport, seg.src, seg.sport)
        if key in self._closed:
            if not syn_only:
                self.stats.ignored += 1
                return None
            del self._closed[key]
            self._closed.pop(rev, None)
        if flags & RST or not (flags & SYN or seg.payload):
            self.stats.ignored += 1  # nothing to deliver: no reason to start a connection
            return None
        if flags & SYN:
            client_is_src = not flags & ACK
        else:
            client_is_src = seg.sport >= seg.dport
        if client_is_src:
            conn, d = Conn(seg.src, seg.sport, seg.dst, seg.dport), 0
        else:
            conn, d = Conn(seg.dst, seg.dport, seg.src, seg.sport), 1
        c = _Conn(conn, t, (key, rev))
        self._table[key] = (c, d)
        self._table[rev] = (c, 1 - d)
        self.stats.connections += 1
        out.append(Open(conn, t, midstream=not flags & SYN))
        return c, d

    def _close(self, c: _Conn, reason: CloseReason, t: int, out: list[Event]) -> None:
        for d in (0, 1):
            self._flush(c, d, t, out)
        c.closed = True
        out.append(Close(c.conn, reason, t))
        linger = t + CLOSED_LINGER_NS
        for key in c.keys:
            del self._table[key]
            self._closed[key] = linger

    def _sweep(self, t: int, out: list[Event]) -> None:
        self._next_sweep = t + SWEEP_INTERVAL_NS
        idle_before, hole_before = t - IDLE_TIMEOUT_NS, t - HOLE_WAIT_NS
        for c, d in list(self._table.values()):
            if d or c.closed:
                continue
            fins = c.halves[0].fin_off >= 0 and c.halves[1].fin_off >= 0
            if c.last < idle_before or (fins and c.last < hole_before):
                self._close(c, "fin" if fins else "idle", t, out)
        if self._closed:
            for key in [k for k, until in self._closed.items() if until <= t]:
                del self._closed[key]

    # -- one direction -----------------------------------------------------

    def _control(self, c: _Conn, d: int, seg: TcpSegment, t: int, out: list[Event]) -> None:
        flags, seq, h = seg.flags, seg.seq, c.halves[d]
        if flags & RST:
            self._close(c, "rst", t, out)
            return
        if flags & SYN:
            if h.isn >= 0 and seq != h.isn:
                if flags & ACK:  # a SYN-ACK that contradicts the one seen: ignore it
                    self.stats.ignored += 1
                    return
                self._close(c, "reused", t, out)
                entry = self._open(seg, (seg.src, seg.sport, seg.dst, seg.dport), t, out)
                if entry is not None:
                    self._control(*entry, seg, t, out)
                return
            h.isn = seq
            seq = (seq + 1) & _MOD  # data in a SYN (TCP Fast Open) starts after it
            if h.next_seq < 0:
                h.next_seq = seq
        payload = seg.payload
        if payload:
            self._data(c, d, seq, payload, t, out)
        if flags & FIN and h.fin_off < 0 and not h.done and not c.closed:
            if h.next_seq < 0:
                h.next_seq = seq
            fin_off = h.next_off + ((seq + len(payload) - h.next_seq + _HALF) & _MOD) - _HALF
            if fin_off < h.next_off:
                return  # a FIN before bytes already delivered: damage, not a close
            h.fin_off = fin_off
            while h.pending and h.pending[-1][0] >= fin_off:  # bytes after a FIN do not exist
                h.pending_bytes -= len(h.pending.pop()[1])
            if h.next_off >= fin_off:
                self._finish(c, d, t, out)

    def _data(self, c: _Conn, d: int, seq: int, payload: memoryview, t: int, out: list[Event]) -> None:
        h = c.halves[d]
        n = len(payload)
        if h.done:
            self.stats.duplicate_bytes += n
            return
        if h.next_seq < 0:
            h.next_seq = seq  # mid-stream start: this direction begins here
        if seq == h.next_seq and not h.pending:  # the common case: the next bytes, nothing waiting
            data = bytes(payload)
            if h.fin_off >= 0 and h.next_off + n > h.fin_off:
                data = data[:h.fin_off - h.next_off]
            h.advance(len(data))
            out.append(Data(c.conn, _DIRECTIONS[d], data, t))
            if h.next_off == h.fin_off:
                self._finish(c, d, t, out)
            return
        start = h.next_off + ((seq - h.next_seq + _HALF) & _MOD) - _HALF
        if start + n <= h.next_off:
            self.stats.duplicate_bytes += n
            return
        self._insert(h, start, payload)
        self._drain(c, d, t, out, skip_holes=False)

    def _acked(self, c: _Conn, d: int, ack: int, t: int, out: list[Event]) -> None:
        """Direction `d`'s receiver acknowledged up to `ack`: holes below it were lost in capture only."""
        h = c.halves[d]
        ack_off = h.next_off + ((ack - h.next_seq + _HALF) & _MOD) - _HALF
        if ack_off <= h.next_off:
            return  # the usual case: acknowledging bytes already delivered
        if h.fin_off >= 0:
            ack_off = min(ack_off, h.fin_off)  # the FIN's own sequence number is no data
        if h.pending:
            if h.pending[0][0] <= ack_off:
                self._drain(c, d, t, out, skip_holes=True, until=ack_off)
        elif h.next_off < ack_off <= h.next_off + MAX_PENDING_BYTES:
            # acknowledged but never captured, nothing behind it yet: lost now, not at close
            hole = ack_off - h.next_off
            out.append(Gap(c.conn, _DIRECTIONS[d], hole, t))
            self.stats.gaps += 1
            self.stats.gap_bytes += hole
            h.advance(hole)

    def _insert(self, h: _Half, start: int, payload: memoryview) -> None:
        """Buffer the bytes of [start, start+len) that nobody delivered or buffered yet."""
        end = start + len(payload)
        if h.fin_off >= 0 and end > h.fin_off:
            end = h.fin_off
        lo = max(start, h.next_off)
        if end <= lo:
            self.stats.duplicate_bytes += len(payload)
            return
        pend = h.pending
        i = bisect_left(pend, (lo,))
        cur = lo
        if i:
            prev_start, prev = pend[i - 1]
            cur = max(cur, prev_start + len(prev))
        pieces: list[tuple[int, bytes]] = []
        j = i
        while cur < end and j < len(pend):
            ps, pd = pend[j]
            if ps >= end:
                break
            if ps > cur:
                pieces.append((cur, bytes(payload[cur - start:ps - start])))
            cur = max(cur, ps + len(pd))
            j += 1
        if cur < end:
            pieces.append((cur, bytes(payload[cur - start:end - start])))
        added = sum(len(p) for _, p in pieces)
        self.stats.duplicate_bytes += len(payload) - added
        if pieces:
            pend[i:j] = sorted(pend[i:j] + pieces)
            h.pending_bytes += added

    def _drain(self, c: _Conn, d: int, t: int, out: list[Event], skip_holes: bool, until: int = -1) -> None:
        """Deliver what is contiguous; skip holes when told to or when the buffer is over its limits."""
        h = c.halves[d]
        pend = h.pending
        pieces: list[bytes] = []
        while True:
            while pend and pend[0][0] <= h.next_off:
                ps, pd = pend.pop(0)
                h.pending_bytes -= len(pd)
                if ps + len(pd) > h.next_off:
                    piece = pd[h.next_off - ps:]
                    pieces.append(piece)
                    h.advance(len(piece))
            if pend and ((skip_holes and (until < 0 or pend[0][0] <= until))
                         or h.pending_bytes > MAX_PENDING_BYTES or len(pend) > MAX_PENDING_SEGMENTS):
                hole = pend[0][0] - h.next_off
            elif skip_holes and until < 0 and h.fin_off > h.next_off:
                hole = h.fin_off - h.next_off  # the bytes before the FIN were lost
            else:
                break
            if pieces:
                out.append(Data(c.conn, _DIRECTIONS[d], b"".join(pieces), t))
                pieces = []
            out.append(Gap(c.conn, _DIRECTIONS[d], hole, t))
            self.stats.gaps += 1
            self.stats.gap_bytes += hole
            h.advance(hole)
        if pieces:
            out.append(Data(c.conn, _DIRECTIONS[d], b"".join(pieces), t))
        if h.fin_off >= 0 and h.next_off >= h.fin_off and not h.done:
            self._finish(c, d, t, out)

    def _flush(self, c: _Conn, d: int, t: int, out: list[Event]) -> None:
        h = c.halves[d]
        if not h.done and (h.pending or h.fin_off > h.next_off):
            h.done = True  # no FIN-close from inside a close
            self._drain(c, d, t, out, skip_holes=True)

    def _finish(self, c: _Conn, d: int, t: int, out: list[Event]) -> None:
        h = c.halves[d]
        h.done = True
        h.next_seq = (h.next_seq + 1) & _MOD  # the FIN takes one sequence number
        other = c.halves[1 - d]
        if other.done and not c.closed:
            self._close(c, "fin", t, out)

"""The on-disk spool: every accepted request is written here before it is acknowledged.

The spool is a write-ahead log cut into segments. A request becomes one frame,
appended to the open segment with a single write() before the producer hears
"accepted": a `kill -9` afterwards cannot lose it (the page cache outlives the
process). A segment is sealed (fsync, rename) when it holds a batch's worth of
rows or is a flush interval old; a sealed segment is one insert per table, with
a deduplication token made of the spool's id, the segment number and the table.
It is deleted only after the store took it. After a crash every segment left is
replayed in order with the same tokens, so the store drops what it already has:
nothing acknowledged is lost and nothing is stored twice.

Frame layout (little endian):  u32 length | u32 crc32(payload) | payload
payload: repeated  u8 table code | u32 length | Arrow IPC stream
A torn frame at the end of the open segment (only possible on power loss or a
full disk) fails its length or checksum and is cut off at recovery.
"""
from __future__ import annotations

import os
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

TABLE_CODES = {"calls": 1, "otel_traces": 2}
CODE_TABLES = {v: k for k, v in TABLE_CODES.items()}
_FRAME = struct.Struct("<II")
_PART = struct.Struct("<BI")
_OPEN, _SEALED = ".open", ".seg"


# Sealed segments whose tables stay in memory for the inserter: enough for the
# one being inserted and the next; a longer backlog is read back from disk.
RECENT_SEGMENTS = 2


class SpoolFull(Exception):
    """No room left in the spool (its byte limit or the disk): producers get 503."""


@dataclass(frozen=True, slots=True)
class Segment:
    seq: int
    path: Path
    size: int


class Spool:
    """Append-only segments of accepted requests, oldest first. Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._open_seq = 0
        self._open_rows = 0
        self._open_size = 0
        self._sealed_bytes = 0
        # The tables of the open segment and of the last few sealed ones, so the
        # inserter need not read back and decode what this process just wrote;
        # older segments (a backlog, or a previous run's) are read from disk.
        self._open_tables: list[dict[str, pa.Table]] = []
        self._recent: dict[int, list[dict[str, pa.Table]]] = {}
        self._recover()
        id_file = self.dir / "spool-id"
        if self._next_seq == 1 or not id_file.exists():
            # With no segment on disk numbering restarts at 1; a fresh id keeps the
            # tokens from repeating ones the store still deduplicates against.
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(uuid.uuid4().hex[:16] + "\n")
            os.replace(tmp, id_file)
        self.id = id_file.read_text().strip()

    # -- recovery --------------------------------------------------------------

    def _recover(self) -> None:
        seqs = []
        for p in self.dir.iterdir():
            if p.suffix in (_OPEN, _SEALED) and p.stem.startswith("seg-"):
                seqs.append(int(p.stem[4:]))
                if p.suffix == _OPEN:
                    self._truncate_torn_tail(p)
                    os.replace(p, p.with_suffix(_SEALED))
        for p in self.dir.glob(f"seg-*{_SEALED}"):
            if p.stat().st_size == 0:
                p.unlink()
            else:
                self._sealed_bytes += p.stat().st_size
        self._next_seq = max(seqs, default=0) + 1

    @staticmethod
    def _truncate_torn_tail(path: Path) -> None:
        data = path.read_bytes()
        good = 0
        while good + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, good)
            end = good + _FRAME.size + length
            if end > len(data) or zlib.crc32(data[good + _FRAME.size:end]) != crc:
                break
            good = end
        if good != len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    # -- writing ---------------------------------------------------------------

    def append(self, tables: dict[str, pa.Table]) -> int:
        """Write one request's tables as one frame; return the rows written.

        Raises SpoolFull when the spool is at its limit or the disk is full.
        """
        payload = encode_payload(tables)
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        rows = sum(t.num_rows for t in tables.values())
        with self._lock:
            if self._sealed_bytes + self._open_size + len(frame) > self.max_bytes:
                raise SpoolFull(f"spool at its limit of {self.max_bytes} bytes")
            if self._fd is None:
                try:
                    fd = os.open(self._path(self._next_seq, _OPEN), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                except OSError as e:  # no inode left, or the directory went read-only
                    raise SpoolFull(f"cannot write spool: {e.strerror}") from None
                self._fd, self._open_seq = fd, self._next_seq
                self._next_seq += 1
            try:
                written = os.write(self._fd, frame)
            except OSError as e:
                self._cut_back()
                raise SpoolFull(f"cannot write spool: {e.strerror}") from None
            if written != len(frame):
                self._cut_back()
                raise SpoolFull("cannot write spool: short write (disk full?)")
            self._open_rows += rows
            self._open_size += len(frame)
            self._open_tables.append(tables)
        return rows

    def _cut_back(self) -> None:
        """Drop a partly written frame so the segment stays well-formed."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._open_size)
        except OSError:
            pass

    @property
    def open_rows(self) -> int:
        return self._open_rows

    def seal(self) -> Segment | None:
        """Close the open segment (fsync + rename); None when nothing is open."""
        with self._lock:
            if self._fd is None:
                return None
            fd, seq, size = self._fd, self._open_seq, self._open_size
            self._fd = None
            self._open_rows = self._open_size = 0
            self._sealed_bytes += size
            self._remember(seq, self._open_tables)
            self._open_tables = []
        os.fsync(fd)
        os.close(fd)
        path = self._path(seq, _SEALED)
        os.replace(self._path(seq, _OPEN), path)
        return Segment(seq, path, size)

    # -- reading and removing --------------------------------------------------

    def sealed(self) -> list[Segment]:
        out = []
        for p in self.dir.glob(f"seg-*{_SEALED}"):
            try:
                out.append(Segment(int(p.stem[4:]), p, p.stat().st_size))
            except FileNotFoundError:
                continue
        return sorted(out, key=lambda s: s.seq)

    def _remember(self, seq: int, tables: list[dict[str, pa.Table]]) -> None:
        self._recent[seq] = tables
        while len(self._recent) > RECENT_SEGMENTS:
            del self._recent[min(self._recent)]

    def read(self, seg: Segment) -> dict[str, pa.Table]:
        """All rows of a segment, one Arrow table per target table."""
        with self._lock:
            recent = self._recent.pop(seg.seq, None)
        if recent is None:
            return self._read_file(seg)
        parts: dict[str, list[pa.Table]] = {}
        for tables in recent:
            for name, table in tables.items():
                if table.num_rows:
                    parts.setdefault(name, []).append(table)
        return {name: pa.concat_tables(ts) for name, ts in parts.items()}

    def _read_file(self, seg: Segment) -> dict[str, pa.Table]:
        """A segment's rows as written on disk.

        Raises ValueError when a frame fails its length or checksum (the disk
        changed it): such a segment is quarantined whole, never stored wrong.
        """
        data = seg.path.read_bytes()
        parts: dict[str, list[pa.Table]] = {}
        pos = 0
        while pos < len(data):
            length, crc = _FRAME.unpack_from(data, pos) if pos + _FRAME.size <= len(data) else (-1, 0)
            payload = data[pos + _FRAME.size:pos + _FRAME.size + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                raise ValueError(f"corrupt frame at byte {pos} of {seg.path}")
            for name, table in decode_payload(payload).items():
                parts.setdefault(name, []).append(table)
            pos += _FRAME.size + length
        return {name: pa.concat_tables(ts) for name, ts in parts.items()}

    def remove(self, seg: Segment) -> None:
        seg.path.unlink(missing_ok=True)
        with self._lock:
            self._sealed_bytes = max(0, self._sealed_bytes - seg.size)

    def quarantine(self, seg: Segment) -> Path:
        """Move a segment the store keeps refusing aside, kept for a person to look at."""
        bad = self.dir / "rejected"
        bad.mkdir(exist_ok=True)
        dest = bad / seg.path.name
        os.replace(seg.path, dest)
        with self._lock:
            self._sealed_bytes = max(0, self._sealed_bytes - seg.size)
        return dest

    @property
    def depth_bytes(self) -> int:
        return self._sealed_bytes + self._open_size

    def token(self, seg: Segment, table: str) -> str:
        return f"meshlens-{self.id}-{seg.seq}-{table}"

    def close(self) -> None:
        self.seal()

    def _path(self, seq: int, suffix: str) -> Path:
        return self.dir / f"seg-{seq:016d}{suffix}"


def encode_payload(tables: dict[str, pa.Table]) -> bytes:
    out = bytearray()
    for name, table in tables.items():
        if table.num_rows == 0:
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        buf = sink.getvalue()
        out += _PART.pack(TABLE_CODES[name], buf.size)
        out += buf.to_pybytes()
    return bytes(out)


def decode_payload(payload: bytes) -> dict[str, pa.Table]:
    out = {}
    pos = 0
    while pos < len(payload):
        code, length = _PART.unpack_from(payload, pos)
        pos += _PART.size
        out[CODE_TABLES[code]] = pa.ipc.open_stream(payload[pos:pos + length]).read_all()
        pos += length
    return out

"""The on-disk spool: every accepted request is written here before it is acknowledged.

The spool is a write-ahead log cut into segments. A request becomes one frame,
appended to the open segment with a single write() before the producer hears
"accepted": a `kill -9` afterwards cannot lose it (the page cache outlives the
process). A segment is sealed (fsync, rename) when it holds a batch's worth of
rows or is a flush interval old; a sealed segment is one insert per table, with
a deduplication token made of the spool's id, the segment number and the table.
It is deleted only after the store took it. After a crash every segment left is
replayed in order with the same tokens, so the store drops what it already has:
nothing acknowledged is lost and nothing is stored twice. (The embedded store dies
with us, possibly inside ClickHouse's insert, after the token's record and before
its part: stores/insert_ledger.py is how it still stores such a replay once.)

Frame layout (little endian):  u32 length | u32 crc32(payload) | payload
payload: [u8 0 | u32 length | batch id, UTF-8]  then repeated  u8 table code | u32 length | Arrow IPC stream
A torn frame at the end of the open segment (only possible on power loss or a
full disk) fails its length or checksum and is cut off at recovery.

A batch id (collector/batch_format.py) is written in its rows' frame, so it is
durable exactly when they are: a batch whose id the spool holds is not appended
again (`append` returns None), whether it came before a crash or not. At start
the ids are read back from the frames of every segment left; the ids of segments
already stored and removed (or quarantined) are appended to `batch-ids`, one a
line, before the segment's file goes, and the newest REMEMBERED_BATCH_IDS of them
are recognised too.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import uuid
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

TABLE_CODES = {"calls": 1, "otel_traces": 2, "mesh_changes": 3}
CODE_TABLES = {v: k for k, v in TABLE_CODES.items()}
_FRAME = struct.Struct("<II")
_PART = struct.Struct("<BI")
_OPEN, _SEALED = ".open", ".seg"
log = logging.getLogger("meshlens.collector")
_ID_PART = 0  # the part code of a frame's batch id; table codes start at 1
_IDS_FILE = "batch-ids"


# Sealed segments whose tables stay in memory for the inserter: enough for the
# one being inserted and the next; a longer backlog is read back from disk.
RECENT_SEGMENTS = 2

# Ids of batches already stored (their segments inserted and removed) still recognised,
# the newest kept. A producer resends a batch whose answer it lost within its timeout
# and backoff (collector/client.py: seconds), or first thing to a restarted collector;
# 100,000 ids are 100 s of a thousand sidecars each sending a batch a second, in ~10 MB.
REMEMBERED_BATCH_IDS = 100_000


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
        # Batch ids: those in each segment on disk (the open one included), and the
        # newest of those already stored, as `batch-ids` holds them.
        self._segment_ids: dict[int, list[str]] = {}
        self._ids_on_disk: set[str] = set()
        self._stored_ids: set[str] = set()
        self._stored_order: deque[str] = deque()
        self._ids_lock = threading.Lock()  # the batch-ids file: appended and rewritten by one writer at a time
        self._ids_lines = 0
        self._recover()
        self._recover_ids()
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

    def _recover_ids(self) -> None:
        """The batch ids of every segment left (read from their frames) and of those stored before (batch-ids)."""
        for seg in self.sealed():
            ids = frame_ids(seg.path)
            if ids:
                self._segment_ids[seg.seq] = ids
                self._ids_on_disk.update(ids)
        path = self.dir / _IDS_FILE
        try:
            lines = path.read_text(errors="replace").split("\n")
        except FileNotFoundError:
            return
        stored = lines[:-1]  # the last piece has no newline: empty, or torn by a crash mid-append
        self._ids_lines = len(stored)
        self._remember_stored(stored[-REMEMBERED_BATCH_IDS:])

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

    def append(self, tables: dict[str, pa.Table], batch_id: str | None = None) -> int | None:
        """Write one request's tables (and the producer's id for them) as one frame; return the rows written.

        None, and nothing written, when `batch_id` is one the spool already took.
        Raises SpoolFull when the spool is at its limit or the disk is full.
        """
        payload = encode_payload(tables, batch_id)
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        rows = sum(t.num_rows for t in tables.values())
        with self._lock:
            if batch_id is not None and self.has_batch(batch_id):
                return None
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
            if batch_id is not None:
                self._segment_ids.setdefault(self._open_seq, []).append(batch_id)
                self._ids_on_disk.add(batch_id)
        return rows

    def has_batch(self, batch_id: str) -> bool:
        """Whether the spool took a batch of this id: still in a segment, or stored not long ago."""
        return batch_id in self._ids_on_disk or batch_id in self._stored_ids

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
        """Delete a segment the store took; its batch ids are remembered first."""
        self._retire_ids(seg.seq)
        seg.path.unlink(missing_ok=True)
        with self._lock:
            self._sealed_bytes = max(0, self._sealed_bytes - seg.size)

    def quarantine(self, seg: Segment) -> Path:
        """Move a segment the store keeps refusing aside, kept for a person to look at.

        Its batches were acknowledged: a resend of one is still a duplicate."""
        self._retire_ids(seg.seq)
        bad = self.dir / "rejected"
        bad.mkdir(exist_ok=True)
        dest = bad / seg.path.name
        os.replace(seg.path, dest)
        with self._lock:
            self._sealed_bytes = max(0, self._sealed_bytes - seg.size)
        return dest

    def _retire_ids(self, seq: int) -> None:
        """A segment's batch ids, from "on disk" to "stored": appended to batch-ids (fsync) before its file goes."""
        ids = self._segment_ids.get(seq)
        if not ids:
            return
        with self._ids_lock:
            path = self.dir / _IDS_FILE
            try:
                with open(path, "a") as f:
                    f.write("\n".join(ids) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # a full disk: the ids stay known until a restart, the rows are stored
                log.warning("cannot record stored batch ids path=%s ids=%d error=%s", path, len(ids), e.strerror or e)
            self._ids_lines += len(ids)
            with self._lock:
                self._remember_stored(ids)
                self._ids_on_disk.difference_update(ids)
                del self._segment_ids[seq]
                kept = list(self._stored_order) if self._ids_lines > 2 * REMEMBERED_BATCH_IDS else None
            if kept is not None:  # rewrite with only what is remembered: the file stays bounded
                tmp = path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    f.write("".join(i + "\n" for i in kept))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                self._ids_lines = len(kept)

    def _remember_stored(self, ids: list[str]) -> None:
        self._stored_ids.update(ids)
        self._stored_order.extend(ids)
        while len(self._stored_order) > REMEMBERED_BATCH_IDS:
            self._stored_ids.discard(self._stored_order.popleft())

    @property
    def depth_bytes(self) -> int:
        return self._sealed_bytes + self._open_size

    def token(self, seg: Segment, table: str) -> str:
        return f"meshlens-{self.id}-{seg.seq}-{table}"

    def close(self) -> None:
        self.seal()

    def _path(self, seq: int, suffix: str) -> Path:
        return self.dir / f"seg-{seq:016d}{suffix}"


def encode_payload(tables: dict[str, pa.Table], batch_id: str | None = None) -> bytes:
    out = bytearray()
    if batch_id is not None:
        raw = batch_id.encode()
        out += _PART.pack(_ID_PART, len(raw)) + raw
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
    """A frame's tables (its batch id, if any, is skipped: `frame_ids` reads those)."""
    out = {}
    pos = 0
    while pos < len(payload):
        code, length = _PART.unpack_from(payload, pos)
        pos += _PART.size
        if code != _ID_PART:
            out[CODE_TABLES[code]] = pa.ipc.open_stream(payload[pos:pos + length]).read_all()
        pos += length
    return out


def frame_ids(path: Path) -> list[str]:
    """The batch ids of a segment's frames, read with a seek a frame (not the rows).

    Stops at the first frame that is cut short; frames are not checksummed here, so a
    segment the disk changed may give a wrong id, which is harmless: reading its rows
    fails their checksum and the segment is quarantined."""
    ids = []
    with open(path, "rb") as f:
        pos = 0
        while len(head := f.read(_FRAME.size)) == _FRAME.size:
            length, _ = _FRAME.unpack(head)
            if length >= _PART.size:
                code, part = _PART.unpack(f.read(_PART.size).ljust(_PART.size, b"\xff"))
                if code == _ID_PART and part <= length - _PART.size:
                    ids.append(f.read(part).decode("utf-8", "replace"))
            pos += _FRAME.size + length
            f.seek(pos)
    return ids

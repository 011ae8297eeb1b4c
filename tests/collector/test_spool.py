"""The write-ahead spool: frames in, the same rows out, across seals, crashes and full disks."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pytest

from meshlens.collector import spool as spool_module
from meshlens.collector.columns import to_table
from meshlens.collector.spool import Segment, Spool, SpoolFull, frame_ids

FRAME_HEADER = struct.Struct("<II")  # u32 length | u32 crc32, as documented in collector/spool.py
BIG = 1 << 30


def calls(n: int, service: str = "checkout", path_bytes: int = 4) -> pa.Table:
    now = time.time_ns()
    return to_table("calls", {
        "time": [now + i for i in range(n)],
        "dst_service": [service] * n,
        "path": ["/" + "x" * path_bytes] * n,
        "status": [200 + i % 3 for i in range(n)],
    })


def spans(n: int, service: str = "checkout") -> pa.Table:
    return to_table("otel_traces", {
        "Timestamp": [time.time_ns()] * n,
        "TraceId": [uuid.uuid4().hex for _ in range(n)],
        "SpanId": [uuid.uuid4().hex[:16] for _ in range(n)],
        "ServiceName": [service] * n,
    })


def frame_sizes(path: Path) -> list[int]:
    """Sizes of the whole frames in a segment file, read with the documented layout."""
    data = path.read_bytes()
    sizes, pos = [], 0
    while pos + FRAME_HEADER.size <= len(data):
        length, _ = FRAME_HEADER.unpack_from(data, pos)
        sizes.append(FRAME_HEADER.size + length)
        pos += FRAME_HEADER.size + length
    return sizes


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("seg-"))


# -- append, seal, read ----------------------------------------------------------


def test_round_trip_of_several_frames_and_both_tables(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    first = {"calls": calls(2, "a"), "otel_traces": spans(1, "a")}
    second = {"calls": calls(3, "b")}
    third = {"otel_traces": spans(2, "c")}

    assert spool.append(first) == 3
    assert spool.append(second) == 3
    assert spool.append(third) == 2
    assert spool.open_rows == 8
    assert files(tmp_path) == ["seg-0000000000000001.open"]

    seg = spool.seal()

    assert seg == Segment(1, tmp_path / "seg-0000000000000001.seg", seg.path.stat().st_size)
    assert files(tmp_path) == ["seg-0000000000000001.seg"]
    assert spool.open_rows == 0
    assert spool.depth_bytes == seg.size
    got = spool.read(seg)
    assert set(got) == {"calls", "otel_traces"}
    assert got["calls"].equals(pa.concat_tables([first["calls"], second["calls"]]))
    assert got["otel_traces"].equals(pa.concat_tables([first["otel_traces"], third["otel_traces"]]))


def test_seal_with_nothing_open_is_none(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    assert spool.seal() is None
    spool.append({"calls": calls(1)})
    assert spool.seal() is not None
    assert spool.seal() is None
    assert [s.seq for s in spool.sealed()] == [1]


def test_sealed_segments_come_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    for i in range(12):  # past 9 and 10: numeric order, not the order of a listing
        spool.append({"calls": calls(1, f"svc{i}")})
        spool.seal()

    segments = spool.sealed()

    assert [s.seq for s in segments] == list(range(1, 13))
    assert [spool.read(s)["calls"]["dst_service"][0].as_py() for s in segments] == [f"svc{i}" for i in range(12)]


def test_remove_drops_the_segment_and_its_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(1)})
    first = spool.seal()
    spool.append({"calls": calls(2)})
    second = spool.seal()
    assert spool.depth_bytes == first.size + second.size

    spool.remove(first)

    assert [s.seq for s in spool.sealed()] == [2]
    assert spool.depth_bytes == second.size


@pytest.mark.parametrize("offset", [8, 12, -1])  # table code, part length, last byte
def test_read_refuses_a_sealed_segment_the_disk_changed(tmp_path: Path, offset: int) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(2)})
    spool.append({"calls": calls(2)})
    seg = spool.seal()
    data = bytearray(seg.path.read_bytes())
    data[offset] ^= 0x01
    seg.path.write_bytes(bytes(data))

    reopened = Spool(tmp_path, BIG)  # after a restart the segment is read back from disk
    with pytest.raises(ValueError, match=f"corrupt frame at byte [0-9]+ of {seg.path}"):
        reopened.read(reopened.sealed()[0])


def test_read_refuses_a_sealed_segment_cut_short(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(2)})
    spool.append({"calls": calls(2)})
    seg = spool.seal()
    first = frame_sizes(seg.path)[0]
    os.truncate(seg.path, first + 5)  # a whole frame and 5 bytes of the next header

    reopened = Spool(tmp_path, BIG)
    with pytest.raises(ValueError, match=f"corrupt frame at byte {first} of"):
        reopened.read(reopened.sealed()[0])


def test_the_last_sealed_segments_are_read_from_memory_and_match_the_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(2), "otel_traces": spans(1)})
    spool.append({"calls": calls(3)})
    seg = spool.seal()
    from_disk = Spool(tmp_path / "unused", BIG)._read_file(seg)
    from_memory = spool.read(seg)
    assert {k: t.num_rows for k, t in from_memory.items()} == {"calls": 5, "otel_traces": 1}
    assert all(from_memory[k].equals(from_disk[k]) for k in from_disk)


# -- tokens ------------------------------------------------------------------------


def test_token_is_stable_across_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(1), "otel_traces": spans(1)})
    seg = spool.seal()
    tokens = (spool.token(seg, "calls"), spool.token(seg, "otel_traces"))
    assert tokens == (f"meshlens-{spool.id}-1-calls", f"meshlens-{spool.id}-1-otel_traces")
    spool.close()

    reopened = Spool(tmp_path, BIG)

    assert reopened.id == spool.id
    [again] = reopened.sealed()
    assert (reopened.token(again, "calls"), reopened.token(again, "otel_traces")) == tokens


def test_numbering_continues_after_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    for _ in range(3):
        spool.append({"calls": calls(1)})
        spool.seal()
    spool.remove(spool.sealed()[0])
    spool.close()

    reopened = Spool(tmp_path, BIG)
    reopened.append({"calls": calls(1)})

    assert reopened.seal().seq == 4
    assert [s.seq for s in reopened.sealed()] == [2, 3, 4]


def test_a_drained_spool_reopened_never_repeats_a_token(tmp_path: Path) -> None:
    # The store remembers tokens (non_replicated_deduplication_window): a token
    # used again after a restart would make it silently drop the new rows.
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(1)})
    seg = spool.seal()
    used = spool.token(seg, "calls")
    spool.remove(seg)
    spool.close()

    reopened = Spool(tmp_path, BIG)
    reopened.append({"calls": calls(1)})
    seg = reopened.seal()

    assert reopened.token(seg, "calls") != used


# -- batch ids -----------------------------------------------------------------------


def test_a_batch_id_is_taken_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)

    assert spool.append({"calls": calls(2)}, "p-0") == 2
    size = spool.depth_bytes
    assert spool.append({"calls": calls(2)}, "p-0") is None  # nothing written
    assert spool.append({"calls": calls(3)}, "p-1") == 3
    assert spool.append({"calls": calls(1)}) == 1  # without an id: always taken

    assert spool.has_batch("p-0") and spool.has_batch("p-1") and not spool.has_batch("p-2")
    assert spool.depth_bytes > size and spool.open_rows == 6
    seg = spool.seal()
    assert spool.read(seg)["calls"].num_rows == 6  # the ids are not rows


def test_the_batch_id_is_the_first_part_of_its_frame(tmp_path: Path) -> None:
    # u8 0 | u32 length | the id, then the tables, as documented in collector/spool.py
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(1)}, "abc-7")
    data = spool.seal().path.read_bytes()

    assert data[FRAME_HEADER.size:FRAME_HEADER.size + 10] == b"\x00\x05\x00\x00\x00abc-7"
    assert frame_ids(spool.sealed()[0].path) == ["abc-7"]


def test_ids_in_segments_left_by_a_kill_9_are_known_after_it(tmp_path: Path) -> None:
    crash_while_appending(tmp_path, [2, 3], ids=["a-0", None])  # killed with its segment open
    crash_while_appending(tmp_path, [4], ids=["a-1"])  # recovers that one, opens another, killed too

    spool = Spool(tmp_path, BIG)

    assert spool.has_batch("a-0") and spool.has_batch("a-1")
    assert spool.append({"calls": calls(1)}, "a-0") is None and spool.append({"calls": calls(1)}, "a-1") is None
    assert sum(spool.read(s)["calls"].num_rows for s in spool.sealed()) == 9


def test_ids_of_a_stored_segment_outlive_it_and_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(1)}, "s-0")
    spool.append({"calls": calls(1)}, "s-1")
    stored = spool.seal()
    spool.append({"calls": calls(1)}, "s-2")
    refused = spool.seal()

    spool.remove(stored)
    spool.quarantine(refused)  # acknowledged, then refused by the store: a resend is still a duplicate

    assert (tmp_path / "batch-ids").read_text() == "s-0\ns-1\ns-2\n"
    assert all(spool.has_batch(i) for i in ("s-0", "s-1", "s-2"))
    reopened = Spool(tmp_path, BIG)  # a restart: no segment is left, the ids are
    assert all(reopened.has_batch(i) for i in ("s-0", "s-1", "s-2"))
    assert reopened.append({"calls": calls(1)}, "s-1") is None
    assert reopened.append({"calls": calls(1)}, "s-3") == 1


def test_a_line_torn_by_a_crash_is_not_an_id(tmp_path: Path) -> None:
    (tmp_path / "batch-ids").write_text("t-0\nt-1\nt-")  # killed mid-append: its segment was not removed yet

    spool = Spool(tmp_path, BIG)

    assert spool.has_batch("t-0") and spool.has_batch("t-1") and not spool.has_batch("t-")


def test_stored_ids_are_remembered_up_to_the_bound_and_the_file_stays_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spool_module, "REMEMBERED_BATCH_IDS", 4)
    spool = Spool(tmp_path, BIG)
    for i in range(11):
        spool.append({"calls": calls(1)}, f"b-{i}")
        spool.remove(spool.seal())

    assert [i for i in range(11) if spool.has_batch(f"b-{i}")] == [7, 8, 9, 10]  # the newest
    lines = (tmp_path / "batch-ids").read_text().splitlines()
    assert len(lines) <= 2 * 4 and lines[-4:] == ["b-7", "b-8", "b-9", "b-10"]
    reopened = Spool(tmp_path, BIG)
    assert [i for i in range(11) if reopened.has_batch(f"b-{i}")] == [7, 8, 9, 10]


def test_ids_still_in_the_spool_are_kept_whatever_the_bound(tmp_path: Path, monkeypatch) -> None:
    # the bound is for ids already stored; a backlog's are recognised until it is stored
    monkeypatch.setattr(spool_module, "REMEMBERED_BATCH_IDS", 2)
    spool = Spool(tmp_path, BIG)
    for i in range(6):
        spool.append({"calls": calls(1)}, f"k-{i}")
        spool.seal()

    assert all(Spool(tmp_path, BIG).has_batch(f"k-{i}") for i in range(6))


# -- recovery after a crash ------------------------------------------------------


def crash_while_appending(directory: Path, rows: list[int], ids: list[str | None] | None = None) -> None:
    """A process appends one frame per entry of `rows` (with the batch id of `ids`, if any) and is killed (-9)
    before sealing."""
    ids = ids or [None] * len(rows)
    script = textwrap.dedent(f"""
        import os, signal, time
        from meshlens.collector.columns import to_table
        from meshlens.collector.spool import Spool
        spool = Spool({str(directory)!r}, {BIG})
        for n, batch_id in zip({rows!r}, {ids!r}):
            spool.append({{"calls": to_table("calls", {{"time": [time.time_ns()] * n, "dst_service": ["s%d" % n] * n}})}},
                         batch_id)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def tear_garbage(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\xff" * 20)


def tear_short_garbage(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # shorter than a frame header


def tear_last_frame_in_half(path: Path) -> None:
    last = frame_sizes(path)[-1]
    os.truncate(path, path.stat().st_size - last // 2)


def flip_byte_of_last_frame(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tear, kept_rows", [
    (tear_garbage, [2, 3]),
    (tear_short_garbage, [2, 3]),
    (tear_last_frame_in_half, [2]),
    (flip_byte_of_last_frame, [2]),
])
def test_open_segment_with_a_torn_tail_is_cut_to_its_good_frames_and_sealed(tmp_path: Path, tear, kept_rows) -> None:
    crash_while_appending(tmp_path, [2, 3])
    open_file = tmp_path / "seg-0000000000000001.open"
    assert files(tmp_path) == [open_file.name]
    good_sizes = frame_sizes(open_file)
    tear(open_file)

    spool = Spool(tmp_path, BIG)

    assert files(tmp_path) == ["seg-0000000000000001.seg"]
    [seg] = spool.sealed()
    assert seg.size == sum(good_sizes[:len(kept_rows)])
    assert spool.depth_bytes == seg.size
    table = spool.read(seg)["calls"]
    assert table.num_rows == sum(kept_rows)
    assert table["dst_service"].to_pylist() == [f"s{n}" for n in kept_rows for _ in range(n)]
    spool.append({"calls": calls(1)})
    assert spool.seal().seq == 2


def test_open_segment_torn_inside_its_first_frame_is_discarded(tmp_path: Path) -> None:
    crash_while_appending(tmp_path, [4])
    tear_last_frame_in_half(tmp_path / "seg-0000000000000001.open")

    spool = Spool(tmp_path, BIG)

    assert files(tmp_path) == []
    assert spool.sealed() == []
    assert spool.depth_bytes == 0
    spool.append({"calls": calls(1)})
    assert spool.seal().seq == 2


def test_intact_open_segment_is_sealed_whole_on_reopen(tmp_path: Path) -> None:
    crash_while_appending(tmp_path, [1, 2, 3])

    spool = Spool(tmp_path, BIG)

    [seg] = spool.sealed()
    assert spool.read(seg)["calls"].num_rows == 6


# -- limits ------------------------------------------------------------------------


def test_spool_full_at_max_bytes_leaves_nothing_half_written(tmp_path: Path) -> None:
    accepted = {"calls": calls(3, "kept")}
    probe = Spool(tmp_path / "probe", BIG)
    probe.append(accepted)
    one_frame = probe.seal().size
    spool = Spool(tmp_path / "spool", max_bytes=one_frame + one_frame // 2)

    assert spool.append(accepted) == 3
    with pytest.raises(SpoolFull, match=f"spool at its limit of {one_frame + one_frame // 2} bytes"):
        spool.append({"calls": calls(3, "refused")})

    assert spool.depth_bytes == one_frame
    assert spool.open_rows == 3
    seg = spool.seal()
    assert seg.size == one_frame == seg.path.stat().st_size
    assert spool.read(seg)["calls"].equals(accepted["calls"])


def test_quarantine_moves_the_segment_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(2)})
    bad = spool.seal()
    spool.append({"calls": calls(1)})
    good = spool.seal()
    content = bad.path.read_bytes()

    dest = spool.quarantine(bad)

    assert dest == tmp_path / "rejected" / "seg-0000000000000001.seg"
    assert dest.read_bytes() == content
    assert not bad.path.exists()
    assert [s.seq for s in spool.sealed()] == [2]
    assert spool.depth_bytes == good.size
    assert [s.seq for s in Spool(tmp_path, BIG).sealed()] == [2]


@contextlib.contextmanager
def tmpfs(tmp_path: Path, options: str) -> Iterator[Path]:
    """A tiny tmpfs: a real full disk (ENOSPC), not a simulated one."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path, "size=256k") as mnt:
        yield mnt


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path, "size=256k,nr_inodes=4") as mnt:  # the root, spool/, spool-id and one segment
        yield mnt


def test_spool_full_when_the_disk_is_full(tiny_disk: Path) -> None:
    spool = Spool(tiny_disk / "spool", BIG)
    accepted = []
    with pytest.raises(SpoolFull, match="cannot write spool"):
        for i in range(100):  # 100 x ~40 KB: far more than 256 KiB
            tables = {"calls": calls(4, f"svc{i}", path_bytes=10_000)}
            spool.append(tables)
            accepted.append(tables["calls"])

    assert 2 <= len(accepted) < 100
    assert spool.open_rows == 4 * len(accepted)
    seg = spool.seal()
    assert seg.path.stat().st_size == seg.size == sum(frame_sizes(seg.path))
    assert spool.read(seg)["calls"].equals(pa.concat_tables(accepted))

    spool.remove(seg)  # room again: the spool takes writes again
    assert spool.append({"calls": calls(4, path_bytes=10_000)}) == 4
    assert spool.seal().seq == 2


def test_spool_full_when_no_segment_file_can_be_created(few_inodes: Path) -> None:
    spool = Spool(few_inodes / "spool", BIG)
    spool.append({"calls": calls(1)})
    first = spool.seal()

    with pytest.raises(SpoolFull, match="cannot write spool: No space left on device"):
        spool.append({"calls": calls(1)})

    assert spool.open_rows == 0 and spool.depth_bytes == first.size
    spool.remove(first)  # an inode free again
    spool.append({"calls": calls(1)})
    assert spool.seal().seq == 2

"""Ingest against the real embedded store: rows in through `submit`, rows out of `meshlens.calls`, once."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pytest

from meshlens.collector.columns import to_table
from meshlens.collector.ingest import BACKOFF_MAX, MAX_REFUSALS, BatchPolicy, Ingest, Overloaded
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.spool import Segment, Spool
from meshlens.collector.stores import Store, connect
from tests.waiting import PATIENCE_S

BIG = 1 << 30
WRITABLE_SERVER = Path(__file__).resolve().parents[1] / "writable_chdb_server.py"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    # chdb opens one data directory per process: every test here shares this one.
    s = connect(f"chdb:{tmp_path_factory.mktemp('store')}")
    migrate(s, Layout())
    yield s
    s.close()


@pytest.fixture
def service() -> str:
    """A dst_service no other test uses, so counts in the shared store are this test's own."""
    return f"svc-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def running() -> Iterator[Callable[[Ingest], Ingest]]:
    started: list[Ingest] = []

    def start(ingest: Ingest) -> Ingest:
        ingest.start()
        started.append(ingest)
        return ingest

    yield start
    for ingest in started:
        ingest.stop(drain_timeout=0)


def calls(n: int, service: str) -> pa.Table:
    now = time.time_ns()  # recent: older rows would fall to the table's TTL
    return to_table("calls", {"time": [now + i for i in range(n)], "dst_service": [service] * n,
                              "status": [200] * n})


def spans(n: int, service: str) -> pa.Table:
    return to_table("otel_traces", {
        "Timestamp": [time.time_ns()] * n,
        "TraceId": [uuid.uuid4().hex for _ in range(n)],
        "SpanId": [uuid.uuid4().hex[:16] for _ in range(n)],
        "ServiceName": [service] * n,
    })


def stored_calls(store: Store, service: str) -> int:
    return store.query_rows(f"SELECT count() FROM meshlens.calls WHERE dst_service = '{service}'")[0][0]


def stored_spans(store: Store, service: str) -> int:
    return store.query_rows(f"SELECT count() FROM meshlens.otel_traces WHERE ServiceName = '{service}'")[0][0]


def metric(metrics: CollectorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def wait_for(check: Callable[[], bool], timeout: float = PATIENCE_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- the normal path -----------------------------------------------------------------


def test_submitted_rows_are_stored_once_after_flush(store: Store, service: str, tmp_path: Path, running) -> None:
    metrics = CollectorMetrics()
    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", metrics, BatchPolicy(flush_interval=3600)))

    assert ingest.submit({"calls": calls(2, service)}, "calls") == 2
    assert ingest.submit({"calls": calls(3, service), "otel_traces": spans(4, service)}, "traces") == 7
    assert ingest.submit({"calls": calls(5, service)}, "calls") == 5
    assert ingest.flush()

    assert stored_calls(store, service) == 10
    assert stored_spans(store, service) == 4
    assert ingest.spool.depth_bytes == 0 and ingest.spool.sealed() == []
    assert metric(metrics, "meshlens_collector_rows_received_total", table="calls") == 10
    assert metric(metrics, "meshlens_collector_rows_received_total", table="otel_traces") == 4
    assert metric(metrics, "meshlens_collector_batches_received_total", endpoint="calls") == 2
    assert metric(metrics, "meshlens_collector_batches_received_total", endpoint="traces") == 1
    assert metric(metrics, "meshlens_collector_rows_inserted_total", table="calls") == 10
    assert metric(metrics, "meshlens_collector_rows_inserted_total", table="otel_traces") == 4
    assert metric(metrics, "meshlens_collector_batches_inserted_total", table="calls") == 1
    assert metric(metrics, "meshlens_collector_batches_inserted_total", table="otel_traces") == 1
    assert metric(metrics, "meshlens_collector_spool_bytes") == 0
    assert metric(metrics, "meshlens_collector_store_up") == 1

    assert ingest.flush()  # nothing new: nothing inserted again
    assert stored_calls(store, service) == 10


def test_a_batch_is_cut_at_batch_rows(store: Store, service: str, tmp_path: Path, running) -> None:
    metrics = CollectorMetrics()
    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", metrics,
                            BatchPolicy(batch_rows=5, flush_interval=3600)))

    ingest.submit({"calls": calls(3, service)}, "calls")
    assert ingest.spool.open_rows == 3  # under batch_rows, and an hour from its flush interval
    ingest.submit({"calls": calls(3, service)}, "calls")  # 6 >= 5: cut, with no flush()

    assert wait_for(lambda: stored_calls(store, service) == 6)
    assert metric(metrics, "meshlens_collector_batches_inserted_total", table="calls") == 1

    ingest.submit({"calls": calls(2, service)}, "calls")
    assert ingest.spool.open_rows == 2
    assert ingest.flush()
    assert stored_calls(store, service) == 8
    assert metric(metrics, "meshlens_collector_batches_inserted_total", table="calls") == 2


def test_a_partial_batch_is_cut_after_flush_interval(store: Store, service: str, tmp_path: Path, running) -> None:
    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics(),
                            BatchPolicy(batch_rows=1000, flush_interval=0.2)))

    ingest.submit({"calls": calls(3, service)}, "calls")

    assert wait_for(lambda: stored_calls(store, service) == 3)


def test_stop_stores_what_was_accepted(store: Store, service: str, tmp_path: Path) -> None:
    ingest = Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics(), BatchPolicy(flush_interval=3600))
    ingest.start()
    ingest.submit({"calls": calls(4, service)}, "calls")

    ingest.stop()

    assert stored_calls(store, service) == 4
    assert ingest.spool.sealed() == []


# -- crashes and restarts ----------------------------------------------------------


def test_segment_the_store_took_before_a_crash_is_stored_once(store: Store, service: str, tmp_path: Path,
                                                               running) -> None:
    before = Spool(tmp_path, BIG)
    before.append({"calls": calls(3, service), "otel_traces": spans(2, service)})
    taken = before.seal()
    before.append({"calls": calls(4, service), "otel_traces": spans(1, service)})
    half_taken = before.seal()
    before.append({"calls": calls(5, service)})
    not_taken = before.seal()
    # The crash: the store took `taken` whole and the calls of `half_taken`,
    # and the process died before removing them from the spool.
    for name, table in before.read(taken).items():
        store.insert(f"meshlens.{name}", table, before.token(taken, name))
    store.insert("meshlens.calls", before.read(half_taken)["calls"], before.token(half_taken, "calls"))
    assert (stored_calls(store, service), stored_spans(store, service)) == (7, 2)

    after = Spool(tmp_path, BIG)
    assert [s.seq for s in after.sealed()] == [taken.seq, half_taken.seq, not_taken.seq]
    ingest = running(Ingest(store, after, "meshlens", CollectorMetrics()))
    assert ingest.flush()

    assert (stored_calls(store, service), stored_spans(store, service)) == (12, 3)


def test_restart_with_a_drained_spool_stores_new_rows(store: Store, tmp_path: Path, running) -> None:
    first, second = f"svc-{uuid.uuid4().hex[:12]}", f"svc-{uuid.uuid4().hex[:12]}"
    ingest = Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics())
    ingest.start()
    ingest.submit({"calls": calls(3, first)}, "calls")
    assert ingest.flush()
    ingest.stop()

    restarted = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics()))
    restarted.submit({"calls": calls(4, second)}, "calls")
    assert restarted.flush()

    assert (stored_calls(store, first), stored_calls(store, second)) == (3, 4)


# -- batch ids: each stored once ------------------------------------------------------


def test_a_resent_batch_is_stored_once_and_counted(store: Store, service: str, tmp_path: Path, running) -> None:
    metrics = CollectorMetrics()
    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", metrics, BatchPolicy(flush_interval=3600)))

    assert ingest.submit({"calls": calls(3, service)}, "calls", "p-0") == 3
    assert ingest.submit({"calls": calls(3, service)}, "calls", "p-0") is None
    assert ingest.flush()
    assert ingest.submit({"calls": calls(3, service)}, "calls", "p-0") is None  # stored and removed: still known
    assert ingest.submit({"calls": calls(2, service)}, "calls", "p-1") == 2
    assert ingest.flush()

    assert stored_calls(store, service) == 5
    assert metric(metrics, "meshlens_collector_duplicate_batches_total") == 2
    assert metric(metrics, "meshlens_collector_rows_received_total", table="calls") == 5
    assert metric(metrics, "meshlens_collector_batches_received_total", endpoint="calls") == 2


def test_a_resend_is_answered_even_when_behind(store: Store, service: str, tmp_path: Path) -> None:
    ingest = Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics(), BatchPolicy(max_backlog_bytes=1))
    ingest.submit({"calls": calls(2, service)}, "calls", "p-0")  # not started: nothing drains

    assert ingest.submit({"calls": calls(2, service)}, "calls", "p-0") is None  # not 429: we have it
    with pytest.raises(Overloaded, match="collector is behind"):
        ingest.submit({"calls": calls(2, service)}, "calls", "p-1")


def spool_and_die(directory: Path, service: str) -> None:
    """A collector's process spools batch k-0, which the store takes (its segment removed, as the inserter
    does), then batch k-1, and is killed (-9) before it could answer that one."""
    script = textwrap.dedent(f"""
        import os, signal, time
        from meshlens.collector.columns import to_table
        from meshlens.collector.spool import Spool
        spool = Spool({str(directory)!r}, 1 << 30)
        def calls(n):
            return {{"calls": to_table("calls", {{"time": [time.time_ns() + i for i in range(n)],
                                                  "dst_service": [{service!r}] * n}})}}
        spool.append(calls(2), "k-0")
        spool.remove(spool.seal())
        spool.append(calls(3), "k-1")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=PATIENCE_S)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


def test_batches_taken_before_a_kill_9_are_duplicates_after_it(store: Store, service: str, tmp_path: Path,
                                                               running) -> None:
    spool_and_die(tmp_path, service)
    metrics = CollectorMetrics()
    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", metrics))

    # k-0 stored and removed before the kill, k-1 spooled and never answered: both known; k-2 is new
    answers = [ingest.submit({"calls": calls(3, service)}, "calls", i) for i in ("k-0", "k-1", "k-2")]
    assert ingest.flush()

    assert answers == [None, None, 3]
    assert stored_calls(store, service) == 3 + 3  # k-1 from the spool it left, k-2
    assert metric(metrics, "meshlens_collector_duplicate_batches_total") == 2


# -- failures ----------------------------------------------------------------------


def test_refused_segment_is_retried_then_quarantined(store: Store, service: str, tmp_path: Path, running) -> None:
    metrics = CollectorMetrics()
    spool = Spool(tmp_path, BIG)
    ingest = running(Ingest(store, spool, "nope", metrics))  # no such database: every insert is refused

    ingest.submit({"calls": calls(4, service)}, "calls")
    assert ingest.flush(timeout=PATIENCE_S)

    assert metric(metrics, "meshlens_collector_insert_errors_total", kind="refused") == MAX_REFUSALS
    assert metric(metrics, "meshlens_collector_dropped_rows_total", reason="refused") == 4
    assert metric(metrics, "meshlens_collector_rows_inserted_total", table="calls") == 0
    assert spool.sealed() == [] and spool.depth_bytes == 0
    [kept] = (tmp_path / "rejected").iterdir()
    assert spool.read(Segment(1, kept, kept.stat().st_size))["calls"]["dst_service"].to_pylist() == [service] * 4


def test_refused_segment_does_not_block_the_ones_behind_it(store: Store, service: str, tmp_path: Path,
                                                           running) -> None:
    metrics = CollectorMetrics()
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": pa.table({"no_such_column": [1, 2]})})
    spool.seal()
    spool.append({"calls": calls(3, service)})
    spool.seal()

    ingest = running(Ingest(store, spool, "meshlens", metrics))
    assert ingest.flush(timeout=PATIENCE_S)

    assert stored_calls(store, service) == 3
    assert metric(metrics, "meshlens_collector_dropped_rows_total", reason="refused") == 2
    assert [p.name for p in (tmp_path / "rejected").iterdir()] == ["seg-0000000000000001.seg"]
    assert ingest.store_up


def rot_arrow_stream(data: bytearray) -> None:
    data[40:60] = b"\xff" * 20


def rot_table_code(data: bytearray) -> None:
    data[8] = 0x7F  # frame header (8 bytes), then the part's table code


def rot_part_length(data: bytearray) -> None:
    data[9:13] = b"\x00\x00\x00\x01"  # the part's u32 length: 16 MiB, past the end


def rot_a_value(data: bytearray) -> None:
    at = bytes(data).index(b"svc-")
    data[at] ^= 0x01  # a string value: the Arrow stream still parses


@pytest.mark.parametrize("rot", [rot_arrow_stream, rot_table_code, rot_part_length, rot_a_value])
def test_unreadable_segment_is_quarantined_and_the_ones_behind_it_stored(store: Store, service: str,
                                                                         tmp_path: Path, running, rot) -> None:
    spool = Spool(tmp_path, BIG)
    spool.append({"calls": calls(2, service)})
    bad = spool.seal()
    spool.append({"calls": calls(3, service)})
    spool.seal()
    data = bytearray(bad.path.read_bytes())
    rot(data)  # bit rot in a sealed segment: its checksum no longer matches
    bad.path.write_bytes(bytes(data))

    ingest = running(Ingest(store, Spool(tmp_path, BIG), "meshlens", CollectorMetrics()))
    assert ingest.flush(timeout=PATIENCE_S)

    assert stored_calls(store, service) == 3
    assert [p.name for p in (tmp_path / "rejected").iterdir()] == [bad.path.name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_keeps_the_spool_until_it_returns(service: str, tmp_path: Path, running) -> None:
    port = free_port()
    remote = connect(f"http://127.0.0.1:{port}/?database=meshlens")
    metrics = CollectorMetrics()
    spool = Spool(tmp_path / "spool", BIG)
    ingest = running(Ingest(remote, spool, "meshlens", metrics, BatchPolicy(max_backlog_bytes=1)))

    ingest.submit({"calls": calls(2, service)}, "calls")
    # the first insert fails, however long it takes to try
    assert wait_for(lambda: metric(metrics, "meshlens_collector_insert_errors_total", kind="unavailable") >= 1)
    assert not ingest.flush(timeout=1)
    assert not ingest.store_up
    assert metric(metrics, "meshlens_collector_store_up") == 0
    assert metric(metrics, "meshlens_collector_insert_errors_total", kind="unavailable") >= 1
    assert len(spool.sealed()) == 1
    # Past max_backlog_bytes, but the store is down: the spool takes it (no 429).
    ingest.submit({"calls": calls(3, service)}, "calls")

    server = subprocess.Popen([sys.executable, str(WRITABLE_SERVER), str(tmp_path / "store"), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        migrate(remote, Layout())
        assert ingest.flush(timeout=BACKOFF_MAX + PATIENCE_S)  # one backoff (at most 30 s), then the insert

        assert stored_calls(remote, service) == 5
        assert ingest.store_up
    finally:
        ingest.stop(drain_timeout=0)
        server.terminate()
        server.wait(30)


# -- backpressure --------------------------------------------------------------------


def test_backlog_above_max_is_429_until_drained(store: Store, service: str, tmp_path: Path) -> None:
    metrics = CollectorMetrics()
    ingest = Ingest(store, Spool(tmp_path, BIG), "meshlens", metrics, BatchPolicy(max_backlog_bytes=1))
    ingest.submit({"calls": calls(2, service)}, "calls")  # not started: nothing drains

    with pytest.raises(Overloaded, match="collector is behind") as exc:
        ingest.submit({"calls": calls(3, service)}, "calls")

    assert (exc.value.status, exc.value.retry_after) == (429, 1)
    assert metric(metrics, "meshlens_collector_rejected_requests_total", reason="backlog") == 1
    ingest.start()
    try:
        assert ingest.flush()
        ingest.submit({"calls": calls(5, service)}, "calls")
        assert ingest.flush()
    finally:
        ingest.stop(drain_timeout=0)
    assert stored_calls(store, service) == 7
    assert metric(metrics, "meshlens_collector_rows_received_total", table="calls") == 7


def test_spool_at_its_limit_is_503_and_keeps_what_it_took(store: Store, service: str, tmp_path: Path) -> None:
    metrics = CollectorMetrics()
    spool = Spool(tmp_path, max_bytes=8_000)  # one frame of these calls (~4.4 KB) fits, two do not
    ingest = Ingest(store, spool, "meshlens", metrics)
    ingest.submit({"calls": calls(2, service)}, "calls")

    with pytest.raises(Overloaded, match="spool at its limit of 8000 bytes") as exc:
        ingest.submit({"calls": calls(3, service)}, "calls")

    assert exc.value.status == 503 and exc.value.retry_after >= 1
    assert metric(metrics, "meshlens_collector_rejected_requests_total", reason="spool_full") == 1
    assert metric(metrics, "meshlens_collector_spool_errors_total") == 1
    assert metric(metrics, "meshlens_collector_rows_received_total", table="calls") == 2
    ingest.start()
    try:
        assert ingest.flush()
    finally:
        ingest.stop(drain_timeout=0)
    assert stored_calls(store, service) == 2

"""CallRecorder against a real `meshlens collector` process: calls recorded, calls stored; drops counted by reason."""
from __future__ import annotations

import dataclasses
import socket
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from meshlens.collector.client import CallRecorder
from meshlens.collector.record import CALL_COLUMN_NAMES, Call
from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S


def start_collector(workdir: Path, *args: str) -> CollectorProcess:
    return CollectorProcess(workdir, None, *args).start()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProcess]:
    proc = start_collector(tmp_path / "collector")
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()


@pytest.fixture
def recorders() -> Iterator[Callable[..., CallRecorder]]:
    made: list[CallRecorder] = []

    def make(url: str, **kw) -> CallRecorder:
        made.append(CallRecorder(url, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close(timeout=0.5)


def calls_url(proc: CollectorProcess) -> str:
    return f"{proc.base}/v1/calls"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(i: int, service: str = "checkout", **kw) -> Call:
    # a recent time: the calls table drops rows older than its retention
    return Call(time=time.time_ns() + i, dst_service=service, path=f"/items/{i}", status=200, **kw)


def stored_calls(proc: CollectorProcess, where: str = "1") -> int:
    return connect(proc.query_url).query_rows(f"SELECT count() FROM meshlens.calls WHERE {where}")[0][0]


def wait_for_count(proc: CollectorProcess, expected: int, where: str = "1", timeout: float = PATIENCE_S) -> int:
    """The collector inserts every 0.2 s; wait (generously) for `expected` rows, return what is there."""
    deadline = time.monotonic() + timeout
    while (n := stored_calls(proc, where)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def wait_until(check: Callable[[], bool], timeout: float = PATIENCE_S) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def collector_metric(proc: CollectorProcess, name: str, label: str) -> float:
    """Sum of the samples of `name` (from the collector's /metrics) that carry `label`."""
    text = urllib.request.urlopen(f"{proc.base}/metrics", timeout=PATIENCE_S).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "{") and label in ln)


# -- calls arrive ------------------------------------------------------------------


def test_recorded_calls_arrive(collector: CollectorProcess, recorders) -> None:
    recorder = recorders(calls_url(collector), flush_interval=0.1)

    for i in range(25):
        recorder.record(call(i, attributes={"zone": "a", "i": str(i)}))

    assert recorder.flush(timeout=PATIENCE_S)
    assert recorder.sent_calls == 25 and recorder.sent_batches >= 1
    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
    assert wait_for_count(collector, 25) == 25
    rows = connect(collector.query_url).query_rows(
        "SELECT dst_service, path, status, attributes['i'] FROM meshlens.calls ORDER BY time LIMIT 2")
    assert rows == [("checkout", "/items/0", 200, "0"), ("checkout", "/items/1", 200, "1")]


def test_big_batches_are_gzipped_and_arrive(collector: CollectorProcess, recorders) -> None:
    recorder = recorders(calls_url(collector), batch_rows=3_000, flush_interval=3600)

    for i in range(3_000):  # ~300 bytes a call in JSON: past GZIP_ABOVE
        recorder.record(call(i, service="big", authority="x" * 200))

    assert recorder.flush(timeout=PATIENCE_S)
    assert recorder.sent_calls == 3_000
    assert wait_for_count(collector, 3_000, "dst_service = 'big'") == 3_000


def test_flush_returns_once_every_recorded_call_is_sent(collector: CollectorProcess, recorders) -> None:
    # No cut before flush(): then the shipping thread holds 20,000 calls it is still
    # encoding, in neither the buffer nor the pending batches, for many of flush's polls.
    recorder = recorders(calls_url(collector), batch_rows=100_000, flush_interval=3600)

    for i in range(20_000):
        recorder.record(call(i, service="flushed", authority="x" * 200))

    assert recorder.flush(timeout=PATIENCE_S)
    assert recorder.sent_calls == 20_000
    assert wait_for_count(collector, 20_000, "dst_service = 'flushed'") == 20_000


def test_a_batch_the_collector_refuses_is_dropped_as_rejected(collector: CollectorProcess, recorders) -> None:
    recorder = recorders(calls_url(collector), flush_interval=3600)

    recorder.record(call(0, service="bad", attempt=300))  # attempt is a UInt8: 400 from the collector
    assert recorder.flush(timeout=PATIENCE_S)
    recorder.record(call(1, service="good"))
    recorder.record(call(2, service="good"))
    assert recorder.flush(timeout=PATIENCE_S)

    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 1}
    assert recorder.sent_calls == 2
    assert wait_for_count(collector, 2, "dst_service = 'good'") == 2
    assert stored_calls(collector, "dst_service = 'bad'") == 0


ALL_COLUMNS = ", ".join(f"`{c}`" for c in CALL_COLUMN_NAMES)


def test_rows_arrive_exactly_as_the_same_calls_do(collector: CollectorProcess, recorders) -> None:
    # The proxy records tuples in CALL_COLUMNS order (Call.as_row()); the tap records Calls.
    # Every column stored must be the same either way, defaults (left out of the batch) included.
    recorder = recorders(calls_url(collector), flush_interval=3600)
    now = time.time_ns()
    calls = [Call(time=now + i, duration_ns=1500 + i, observer="server", observer_id="sc-1", src_addr="10.0.0.1",
                  src_port=4000 + i, dst_service="rows", method="GET", path=f"/r/{i}", authority="h\u00e9",
                  status=200 if i % 2 else 503, attributes={"x_request_id": f"id-{i}"} if i % 3 else {})
             for i in range(12)]
    calls[5].grpc_status, calls[5].tls, calls[5].attempt = 14, True, 2  # one row off the defaults

    for c in calls:
        recorder.record(c)
    assert recorder.flush(timeout=PATIENCE_S)
    for c in calls:
        recorder.record(dataclasses.replace(c, dst_service="as-rows").as_row())
    assert recorder.flush(timeout=PATIENCE_S)

    assert recorder.sent_calls == 24 and recorder.dropped["rejected"] == 0
    assert wait_for_count(collector, 24) == 24
    store = connect(collector.query_url)
    as_calls = store.query_rows(f"SELECT {ALL_COLUMNS} FROM meshlens.calls WHERE dst_service = 'rows' ORDER BY time")
    as_rows = store.query_rows(f"SELECT {ALL_COLUMNS} FROM meshlens.calls WHERE dst_service = 'as-rows' ORDER BY time")
    service = CALL_COLUMN_NAMES.index("dst_service")
    assert len(as_calls) == 12
    assert [r[:service] + r[service + 1:] for r in as_rows] == [r[:service] + r[service + 1:] for r in as_calls]


def test_rows_and_calls_mix_in_one_batch_and_a_malformed_row_is_rejected(collector: CollectorProcess,
                                                                          recorders) -> None:
    recorder = recorders(calls_url(collector), flush_interval=3600)

    recorder.record(call(0, service="mixed"))
    recorder.record(call(1, service="mixed").as_row())
    recorder.record(call(2, service="mixed").as_row()[:-1])  # a producer's bug: one value short
    recorder.record(call(3, service="mixed"))
    assert recorder.flush(timeout=PATIENCE_S)

    assert recorder.sent_calls == 3
    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 1}
    assert wait_for_count(collector, 3, "dst_service = 'mixed'") == 3
    paths = connect(collector.query_url).query_rows("SELECT path FROM meshlens.calls ORDER BY time")
    assert paths == [("/items/0",), ("/items/1",), ("/items/3",)]


def test_a_batch_of_only_malformed_rows_sends_nothing(collector: CollectorProcess, recorders) -> None:
    recorder = recorders(calls_url(collector), flush_interval=3600)

    recorder.record(("too", "short"))
    assert recorder.flush(timeout=PATIENCE_S)

    assert recorder.sent_batches == 0 and recorder.dropped["rejected"] == 1


# -- the buffer ------------------------------------------------------------------


def test_buffer_full_drops_exactly_the_overflow(collector: CollectorProcess, recorders) -> None:
    # No size trigger (batch_rows > max_buffered) and no timer: the buffer only fills.
    recorder = recorders(calls_url(collector), batch_rows=1_000, flush_interval=3600, max_buffered=10)

    for i in range(15):
        recorder.record(call(i, service="overflow"))

    assert recorder.buffered == 10
    assert recorder.dropped["buffer_full"] == 5
    assert recorder.flush(timeout=PATIENCE_S)
    assert recorder.sent_calls == 10
    assert recorder.dropped == {"buffer_full": 5, "collector_unavailable": 0, "rejected": 0}
    assert wait_for_count(collector, 10, "dst_service = 'overflow'") == 10


# -- the collector is down -----------------------------------------------------------


def record_batches(recorder: CallRecorder, batches: int, rows: int) -> None:
    """Record `batches` times `rows` calls to services batch0, batch1, ..., each group its own batch.

    The recorder has batch_rows == rows and no timer: reaching `rows` wakes the shipping
    thread, and the next group waits until it has cut the batch.
    """
    for b in range(batches):
        for r in range(rows):
            recorder.record(call(b * rows + r, service=f"batch{b}"))
        assert wait_until(lambda: recorder.buffered == 0), "the shipping thread did not cut a batch"


def test_unreachable_collector_keeps_the_newest_batches_and_counts_the_rest(recorders, caplog) -> None:
    recorder = recorders(f"http://127.0.0.1:{free_port()}/v1/calls", batch_rows=2, flush_interval=3600,
                         max_pending_batches=3)

    with caplog.at_level("WARNING", logger="meshlens.client"):
        record_batches(recorder, batches=5, rows=2)

    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 4, "rejected": 0}  # the 2 oldest
    assert recorder.sent_calls == 0
    assert not recorder.flush(timeout=0.3)
    # logged once per burst, in words
    (line,) = [r.getMessage() for r in caplog.records if "collector unavailable" in r.getMessage()]
    assert line.endswith("error=connection refused") and "Errno" not in line


def test_record_returns_while_the_collector_does_not_answer(recorders) -> None:
    """A collector that accepts the connection and never answers: the shipping thread is stuck, callers are not."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(PATIENCE_S)
        port = listener.getsockname()[1]
        recorder = recorders(f"http://127.0.0.1:{port}/v1/calls", batch_rows=1, flush_interval=3600,
                             max_buffered=100, timeout=60)

        recorder.record(call(0))
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(PATIENCE_S)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            assert request.startswith(b"POST /v1/calls HTTP/1.1")
            # The POST is out and unanswered: the shipping thread waits for us.

            for i in range(1, 151):
                recorder.record(call(i))

            assert recorder.buffered == 100
            assert recorder.dropped["buffer_full"] == 50
            assert recorder.sent_batches == 0
            assert not recorder.flush(timeout=0.2)  # flush is bounded too


def test_collector_that_comes_up_later_gets_the_kept_batches(tmp_path: Path, recorders) -> None:
    port = free_port()
    recorder = recorders(f"http://127.0.0.1:{port}/v1/calls", batch_rows=2, flush_interval=3600,
                         max_pending_batches=2)
    record_batches(recorder, batches=3, rows=2)
    assert recorder.sent_calls == 0
    assert recorder.dropped["collector_unavailable"] == 2  # batch0, the oldest

    proc = start_collector(tmp_path / "collector", "--otlp-http-port", str(port))
    try:
        assert recorder.flush(timeout=PATIENCE_S)
        assert recorder.sent_calls == 4 and recorder.sent_batches == 2
        assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 2, "rejected": 0}
        assert wait_for_count(proc, 4, "dst_service IN ('batch1', 'batch2')") == 4
        assert stored_calls(proc, "dst_service = 'batch0'") == 0
    finally:
        proc.stop()
        proc.kill()


def test_a_full_collector_is_retried_after_retry_after(tmp_path: Path, recorders) -> None:
    # A spool of one byte takes nothing: every batch is answered 503 with Retry-After: 1.
    proc = start_collector(tmp_path / "collector", "--spool-max-bytes", "1")
    try:
        recorder = recorders(calls_url(proc), batch_rows=2, flush_interval=3600)
        t0 = time.monotonic()
        record_batches(recorder, batches=1, rows=2)

        # Three answers, however long they take; flush() wakes the shipping thread every 20 ms, and
        # Retry-After, not that, sets the pace: a second at least between answers, not a tight loop.
        deadline = t0 + PATIENCE_S
        while collector_metric(proc, "meshlens_collector_requests_total", 'code="503"') < 3:
            assert time.monotonic() < deadline, "the recorder did not retry"
            assert not recorder.flush(timeout=0.5)  # flushing, too, waits as the collector asked
        assert time.monotonic() - t0 > 2.0
        assert recorder.sent_calls == 0
        assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
    finally:
        proc.stop()
        proc.kill()

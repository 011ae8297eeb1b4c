"""CallRecorder against a real `meshlens collector` process: calls recorded, calls stored; drops counted by reason."""
from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from meshlens.collector.batch_format import encode
from meshlens.collector.client import CallRecorder
from meshlens.collector.record import CALL_COLUMN_NAMES, Call
from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S


def start_collector(workdir: Path, *args: str) -> CollectorProcess:
    return CollectorProcess(workdir, None, *args).start()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """One for the module: each test sends calls of its own services and reads its metrics as differences."""
    proc = start_collector(tmp_path_factory.mktemp("collector"))
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
    assert wait_for_count(collector, 25, "dst_service = 'checkout'") == 25
    rows = connect(collector.query_url).query_rows(
        "SELECT dst_service, path, status, attributes['i'] FROM meshlens.calls WHERE dst_service = 'checkout' "
        "ORDER BY time LIMIT 2")
    assert rows == [("checkout", "/items/0", 200, "0"), ("checkout", "/items/1", 200, "1")]


def test_big_batches_are_gzipped_and_arrive(collector: CollectorProcess, recorders) -> None:
    # on loopback a recorder does not compress by default (CPU for nothing); one that is told to
    recorder = recorders(calls_url(collector), batch_rows=3_000, flush_interval=3600, compress=True)

    for i in range(3_000):  # ~300 bytes a call in JSON: past GZIP_ABOVE
        recorder.record(call(i, service="big", authority="x" * 200))

    assert recorder.flush(timeout=PATIENCE_S)
    assert recorder.sent_calls == 3_000
    assert wait_for_count(collector, 3_000, "dst_service = 'big'") == 3_000


@pytest.mark.parametrize("url, compress", [
    ("http://127.0.0.1:4318/v1/calls", False), ("http://localhost:4318/v1/calls", False),
    ("http://[::1]:4318/v1/calls", False), ("http://10.0.0.7:4318/v1/calls", True),
    ("http://collector.mesh:4318/v1/calls", True),
])
def test_bodies_are_compressed_unless_the_collector_is_on_loopback(recorders, url: str, compress: bool) -> None:
    assert recorders(url).compress is compress


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
    assert wait_for_count(collector, 24, "dst_service IN ('rows', 'as-rows')") == 24
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
    paths = connect(collector.query_url).query_rows("SELECT path FROM meshlens.calls WHERE dst_service = 'mixed' "
                                                    "ORDER BY time")
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
                         max_unsent_calls=6)

    with caplog.at_level("WARNING", logger="meshlens.client"):
        record_batches(recorder, batches=5, rows=2)

    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 4, "rejected": 0}  # the 2 oldest
    assert recorder.sent_calls == 0 and recorder.unsent_calls == 6
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
                         max_unsent_calls=4)
    record_batches(recorder, batches=3, rows=2)
    assert recorder.sent_calls == 0
    assert recorder.dropped["collector_unavailable"] == 2  # batch0, the oldest
    assert recorder.unsent_calls == 4

    proc = start_collector(tmp_path / "collector", "--otlp-http-port", str(port))
    try:
        assert recorder.flush(timeout=PATIENCE_S)
        assert recorder.sent_calls == 4 and recorder.sent_batches == 2 and recorder.unsent_calls == 0
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


# -- batch ids: a resend is stored once ------------------------------------------------


class LossyRelay:
    """A TCP relay in front of the collector that can lose answers: the collector gets the batch (and
    answers it), the recorder never hears back. The first `lose` answers are swallowed; each such
    connection is held open until `release` is set, then closed unanswered, as a dying collector's is."""

    def __init__(self, upstream_port: int, lose: int = 1) -> None:
        self.upstream_port = upstream_port
        self.lose = lose
        self.lost = threading.Event()  # an answer was swallowed
        self.release = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/calls"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            while (request := read_message(reader)) is not None:
                with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=PATIENCE_S) as up:
                    up.sendall(request)
                    answer = read_message(up.makefile("rb"))
                if self.lose > 0:
                    self.lose -= 1
                    self.lost.set()
                    self.release.wait(PATIENCE_S)
                    return  # closed, unanswered
                conn.sendall(answer or b"")

    def close(self) -> None:
        self.release.set()
        self._listener.close()


def read_message(reader) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body, as bytes; None at the end of the stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return None
        head += line
    length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
    return head + reader.read(length)


def test_a_batch_whose_answer_was_lost_is_resent_and_stored_once(collector: CollectorProcess, recorders) -> None:
    received, duplicates = rows_received(collector), duplicate_batches(collector)
    relay = LossyRelay(collector.http_port, lose=1)
    relay.release.set()  # the lost answer's connection closes at once: the recorder tries again
    try:
        recorder = recorders(relay.url, batch_rows=50, flush_interval=3600)
        for i in range(50):
            recorder.record(call(i, service="resent"))

        assert recorder.flush(timeout=PATIENCE_S)
        assert relay.lost.is_set()
        assert recorder.sent_calls == 50 and recorder.duplicate_batches == 1
        assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
        # the resend never reached the spool: the rows are in it once
        assert rows_received(collector) - received == 50
        assert duplicate_batches(collector) - duplicates == 1
        assert wait_for_count(collector, 50, "dst_service = 'resent'") == 50
    finally:
        relay.close()


@pytest.mark.parametrize("window", ["in the spool", "stored and removed"])
def test_a_batch_accepted_before_a_kill_9_is_recognised_after_the_restart(tmp_path: Path, recorders,
                                                                          window: str) -> None:
    """The collector took the batch and died before the recorder heard back: the resend, to the collector
    restarted on the same port and directories, is answered as a duplicate, whether the batch was still in
    the spool (an open segment, recovered at start) or already stored and its segment removed."""
    port = free_port()
    held = ["--flush-interval", "3600"] if window == "in the spool" else []  # nothing sealed, nothing inserted
    first = start_collector(tmp_path / "collector", "--otlp-http-port", str(port), *held)
    relay = LossyRelay(port, lose=1)
    try:
        recorder = recorders(relay.url, batch_rows=40, flush_interval=3600)
        for i in range(40):
            recorder.record(call(i, service="across"))
        assert relay.lost.wait(PATIENCE_S), "the batch never reached the collector"
        if window == "stored and removed":
            assert wait_for_count(first, 40, "dst_service = 'across'") == 40
            assert wait_until(lambda: "meshlens_collector_spool_bytes 0.0" in metrics_text(first))
        first.kill()  # SIGKILL
        second = start_collector(tmp_path / "collector", "--otlp-http-port", str(port))
        try:
            relay.release.set()  # the recorder's connection closes unanswered: it resends

            assert recorder.flush(timeout=PATIENCE_S)
            assert recorder.sent_calls == 40 and recorder.duplicate_batches == 1
            assert "meshlens_collector_duplicate_batches_total 1.0" in metrics_text(second)
            assert collector_metric(second, "meshlens_collector_rows_received_total", 'table="calls"') == 0
            # what the second collector stores is what the first left in its spool, once
            assert wait_until(lambda: "meshlens_collector_spool_bytes 0.0" in metrics_text(second))
            assert stored_calls(second, "dst_service = 'across'") == 40
        finally:
            second.stop()
            second.kill()
    finally:
        relay.close()
        first.kill()


def test_the_same_id_posted_twice_is_answered_duplicate_and_stored_once(collector: CollectorProcess) -> None:
    body = encode({"time": [time.time_ns() + i for i in range(3)], "dst_service": ["twice"] * 3}, "prod-1-0")
    received, duplicates = rows_received(collector), duplicate_batches(collector)

    answers = [post_calls(collector, body) for _ in range(2)]

    assert answers[0] == (200, {"accepted": 3, "rows": 3})
    assert answers[1] == (200, {"accepted": 3, "rows": 0, "duplicate": True})
    assert rows_received(collector) - received == 3
    assert duplicate_batches(collector) - duplicates == 1
    assert wait_for_count(collector, 3, "dst_service = 'twice'") == 3
    # another id is another batch, however alike the rows
    assert post_calls(collector, body.replace(b"prod-1-0", b"prod-1-1")) == (200, {"accepted": 3, "rows": 3})
    assert wait_for_count(collector, 6, "dst_service = 'twice'") == 6


@pytest.mark.parametrize("batch_id, message", [
    (7, "'id' must be a string (the producer's batch id), not int"),
    ("x" * 65, "'id' must be 1 to 64 characters, not 65"),
    ("", "'id' must be 1 to 64 characters, not 0"),
    ("a b", "'id' may hold only A-Z a-z 0-9 . _ : -"),
])
def test_a_malformed_batch_id_is_a_400_in_one_line(collector: CollectorProcess, batch_id, message: str) -> None:
    body = json.dumps({"v": 1, "id": batch_id, "n": 1, "columns": {"dst_service": ["bad-id"]}}).encode()

    assert post_calls(collector, body) == (400, {"error": message})
    assert stored_calls(collector, "dst_service = 'bad-id'") == 0


def post_calls(proc: CollectorProcess, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(calls_url(proc), data=body, method="POST",
                                 headers={"Content-Type": "application/x-meshlens-calls+json"})
    try:
        with urllib.request.urlopen(req, timeout=PATIENCE_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metrics_text(proc: CollectorProcess) -> str:
    return urllib.request.urlopen(f"{proc.base}/metrics", timeout=PATIENCE_S).read().decode()


def rows_received(proc: CollectorProcess) -> float:
    return collector_metric(proc, "meshlens_collector_rows_received_total", 'table="calls"')


def duplicate_batches(proc: CollectorProcess) -> float:
    [value] = [float(ln.rsplit(" ", 1)[1]) for ln in metrics_text(proc).splitlines()
               if ln.startswith("meshlens_collector_duplicate_batches_total ")]
    return value


# -- the unsent batches while the collector is away ---------------------------------------


def test_the_unsent_bound_drops_the_oldest_batch_only_at_the_bound(recorders) -> None:
    recorder = recorders(f"http://127.0.0.1:{free_port()}/v1/calls", batch_rows=3, flush_interval=3600,
                         max_unsent_calls=9)

    seen = []
    for b in range(5):
        record_batches_from(recorder, b, rows=3)
        seen.append((recorder.unsent_calls, recorder.dropped["collector_unavailable"]))

    assert seen == [(3, 0), (6, 0), (9, 0), (9, 3), (9, 6)]  # nothing goes until the bound, then one batch each
    assert recorder.dropped["buffer_full"] == 0 and recorder.sent_calls == 0


def test_while_the_collector_is_away_calls_are_cut_into_unsent_batches_not_dropped(recorders) -> None:
    # The buffer of calls not yet cut holds 100: the outage is carried by the unsent batches, not by it.
    recorder = recorders(f"http://127.0.0.1:{free_port()}/v1/calls", batch_rows=50, flush_interval=3600,
                         max_buffered=100)

    for b in range(40):
        record_batches_from(recorder, b, rows=50)

    assert recorder.dropped == {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
    assert recorder.unsent_calls == 2_000 and recorder.buffered == 0


def test_the_backlog_drains_once_the_collector_returns(tmp_path: Path, recorders, caplog) -> None:
    port = free_port()
    recorder = recorders(f"http://127.0.0.1:{port}/v1/calls", batch_rows=25, flush_interval=3600)
    for b in range(20):
        record_batches_from(recorder, b, rows=25)
    assert recorder.unsent_calls == 500 and recorder.sent_calls == 0

    proc = start_collector(tmp_path / "collector", "--otlp-http-port", str(port))
    try:
        with caplog.at_level("INFO", logger="meshlens.client"):
            assert recorder.flush(timeout=PATIENCE_S)

        assert recorder.sent_calls == 500 and recorder.sent_batches == 20 and recorder.unsent_calls == 0
        assert recorder.duplicate_batches == 0 and not any(recorder.dropped.values())
        assert wait_for_count(proc, 500, "dst_service LIKE 'batch%'") == 500
        assert [r.getMessage() for r in caplog.records if "accepting again" in r.getMessage()] == [
            f"collector accepting again url=http://127.0.0.1:{port}/v1/calls unsent_calls=475"]
    finally:
        proc.stop()
        proc.kill()


def record_batches_from(recorder: CallRecorder, b: int, rows: int) -> None:
    """Record `rows` calls to service batch{b} and wait until the shipping thread has cut them."""
    for r in range(rows):
        recorder.record(call(b * rows + r, service=f"batch{b}"))
    assert wait_until(lambda: recorder.buffered == 0), "the shipping thread did not cut a batch"

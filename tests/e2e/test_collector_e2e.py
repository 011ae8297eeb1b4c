"""The collector as users run it: a real subprocess, real OTel SDK exporters, real clients."""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meshlens.collector import batch_format
from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S

ROOT = Path(__file__).resolve().parents[2]


def post(url: str, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=PATIENCE_S) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_for(predicate, timeout: float = PATIENCE_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def count(store, sql: str) -> int:
    return int(store.query_rows(sql)[0][0])


def calls_batch(ids: range, service: str = "checkout", trace: bool = False) -> bytes:
    now = time.time_ns()
    cols = {
        "time": [now + i for i in ids],
        "duration_ns": [1_000_000 + i for i in ids],
        "observer": ["client"] * len(ids),
        "src_service": ["frontend"] * len(ids),
        "dst_service": [service] * len(ids),
        "protocol": ["http/1.1"] * len(ids),
        "method": ["GET"] * len(ids),
        "path": [f"/items/{i}" for i in ids],
        "status": [200] * len(ids),
        "attributes": [{"seq": str(i)} for i in ids],
    }
    if trace:
        cols["trace_id"] = [f"{i + 1:032x}" for i in ids]
        cols["span_id"] = [f"{i + 1:016x}" for i in ids]
    return batch_format.encode(cols)


# -- OpenTelemetry SDK → collector → clickhouse-connect -------------------------------

def test_spans_from_the_otel_sdk_over_http_and_grpc_are_queryable_with_clickhouse_connect(tmp_path):
    clickhouse_connect = pytest.importorskip("clickhouse_connect")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    with CollectorProcess(tmp_path) as col:
        for name, exporter in (("http-svc", HttpExporter(endpoint=f"{col.base}/v1/traces",
                                                               compression=Compression.Gzip)),
                               ("grpc-svc", GrpcExporter(endpoint=f"127.0.0.1:{col.grpc_port}", insecure=True))):
            provider = TracerProvider(resource=Resource.create({"service.name": name}))
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            tracer = provider.get_tracer("e2e")
            with tracer.start_as_current_span("GET /orders/{id}", kind=SpanKind.SERVER,
                                              attributes={"http.request.method": "GET", "url.path": "/orders/7",
                                                          "http.route": "/orders/{id}",
                                                          "http.response.status_code": 200}):
                with tracer.start_as_current_span("lookup", attributes={"db.system": "none"}):
                    pass
            provider.shutdown()

        port = int(col.query_url.rsplit(":", 1)[1].strip("/"))
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port)
        wait_for(lambda: client.command("SELECT count() FROM meshlens.otel_traces") == 4, what="4 spans")
        # the calls made from the server spans are an insert of their own: they may land later
        wait_for(lambda: client.command("SELECT count() FROM meshlens.calls") == 2, what="2 calls")
        rows = client.query("SELECT ServiceName, SpanName, SpanKind FROM meshlens.otel_traces "
                            "ORDER BY ServiceName, SpanName").result_rows
        assert rows == [("grpc-svc", "GET /orders/{id}", "Server"), ("grpc-svc", "lookup", "Internal"),
                        ("http-svc", "GET /orders/{id}", "Server"), ("http-svc", "lookup", "Internal")]
        calls = client.query("SELECT observer, dst_service, method, path, route, status FROM meshlens.calls "
                             "ORDER BY dst_service").result_rows
        assert calls == [("otlp", "grpc-svc", "GET", "/orders/7", "/orders/{id}", 200),
                         ("otlp", "http-svc", "GET", "/orders/7", "/orders/{id}", 200)]
        lookup = client.command("SELECT count() FROM meshlens.otel_traces_trace_id_ts FINAL")
        assert lookup == 2  # one row per trace in the exporter's trace-id lookup
        client.close()


def test_call_batches_with_trace_context_are_also_written_as_spans(tmp_path):
    with CollectorProcess(tmp_path) as col:
        status, body, _ = post(f"{col.base}/v1/calls", calls_batch(range(10), trace=True), batch_format.CONTENT_TYPE)
        assert status == 200, body
        assert json.loads(body)["accepted"] == 10
        status, _, _ = post(f"{col.base}/v1/calls", calls_batch(range(10, 15)), batch_format.CONTENT_TYPE)
        assert status == 200
        store = connect(col.query_url)
        wait_for(lambda: count(store, "SELECT count() FROM meshlens.calls") == 15, what="15 calls")
        wait_for(lambda: count(store, "SELECT count() FROM meshlens.otel_traces") == 10, what="10 spans")
        assert store.query_rows("SELECT DISTINCT ServiceName, SpanKind FROM meshlens.otel_traces") == [
            ("frontend", "Client")]


# -- bad input: clear 4xx, nothing lost, still serving -----------------------------

def test_bad_requests_get_4xx_with_a_message_and_the_collector_keeps_serving(tmp_path):
    from google.rpc import status_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    with CollectorProcess(tmp_path, None, "--max-body-bytes", "100000") as col:
        url = f"{col.base}/v1/traces"
        status, body, _ = post(url, b"hello", "text/plain")
        assert status == 415 and b"Content-Type" in body

        status, body, headers = post(url, b"\xff\xff\xff\xff garbage", "application/x-protobuf")
        assert status == 400 and headers["Content-Type"].startswith("application/x-protobuf")
        msg = status_pb2.Status.FromString(body)
        assert msg.code == 3 and msg.message

        status, body, _ = post(url, b'{"resourceSpans": [', "application/json")
        assert status == 400 and json.loads(body)["message"]

        status, body, _ = post(url, b"x" * 200_000, "application/x-protobuf")
        assert status == 413

        bomb = gzip.compress(b"\0" * 5_000_000)
        status, body, _ = post(url, bomb, "application/x-protobuf", {"Content-Encoding": "gzip"})
        assert status == 413

        status, body, _ = post(url, b"not gzip", "application/x-protobuf", {"Content-Encoding": "gzip"})
        assert status == 400

        # two valid spans, one with a zero trace id and one with a short span id: partial success
        req = trace_service_pb2.ExportTraceServiceRequest()
        ss = req.resource_spans.add().scope_spans.add()
        for tid, sid in ((b"\1" * 16, b"\2" * 8), (b"\0" * 16, b"\3" * 8), (b"\4" * 16, b"\5" * 3),
                         (b"\6" * 16, b"\7" * 8)):
            ss.spans.add(trace_id=tid, span_id=sid, name="s", kind=trace_pb2.Span.SPAN_KIND_SERVER,
                         start_time_unix_nano=time.time_ns(), end_time_unix_nano=time.time_ns() + 5)
        status, body, _ = post(url, req.SerializeToString(), "application/x-protobuf")
        assert status == 200
        reply = trace_service_pb2.ExportTraceServiceResponse.FromString(body)
        assert reply.partial_success.rejected_spans == 2 and reply.partial_success.error_message

        # unknown OTLP JSON fields are accepted
        doc = {"resourceSpans": [{"futureField": 1, "scopeSpans": [{"spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "j",
            "kind": 2, "startTimeUnixNano": str(time.time_ns()), "endTimeUnixNano": str(time.time_ns() + 9),
            "somethingNew": {"x": 1}}]}]}]}
        status, body, _ = post(url, json.dumps(doc).encode(), "application/json")
        assert status == 200, body

        calls = f"{col.base}/v1/calls"
        for bad in (b"{", b'{"v": 2, "n": 0, "columns": {}}', b'{"v":1,"n":1,"columns":{"bogus":[1]}}',
                    b'{"v":1,"n":1,"columns":{"status":["two hundred"]}}'):
            status, body, _ = post(calls, bad, batch_format.CONTENT_TYPE)
            assert status == 400 and json.loads(body)["error"], bad
        status, _, _ = post(calls, b"{}", "text/csv")
        assert status == 415

        import grpc  # malformed protobuf over OTLP/gRPC: INVALID_ARGUMENT with the decoder's message
        with grpc.insecure_channel(f"127.0.0.1:{col.grpc_port}") as channel:
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.RpcError) as err:
                export(b"\xff\xff\xff\xff garbage", timeout=PATIENCE_S)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()

        with urllib.request.urlopen(f"{col.base}/healthz", timeout=PATIENCE_S) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        store = connect(col.query_url)
        wait_for(lambda: count(store, "SELECT count() FROM meshlens.otel_traces") == 3, what="3 good spans")
        with urllib.request.urlopen(f"{col.base}/metrics", timeout=PATIENCE_S) as resp:
            metrics = resp.read().decode()
        assert "meshlens_collector_rejected_spans_total 2.0" in metrics
        assert 'meshlens_collector_rejected_requests_total{reason="bad_request"}' in metrics


# -- durability: kill -9, store outages ------------------------------------------------

def _producer(base: str, acked: list[int], stop: threading.Event, start: int, per_batch: int = 200) -> None:
    i = start
    while not stop.is_set():
        try:
            status, _, _ = post(f"{base}/v1/calls", calls_batch(range(i, i + per_batch)), batch_format.CONTENT_TYPE)
        except OSError:
            return  # the collector died mid-request: that batch was never acknowledged
        if status == 200:
            acked.extend(range(i, i + per_batch))
        i += per_batch


def test_kill_9_at_any_moment_loses_no_acknowledged_call_and_duplicates_none(tmp_path):
    acked: list[int] = []
    next_id = 0
    for round_, delay in enumerate((0.3, 1.1, 2.3)):
        col = CollectorProcess(tmp_path, None, "--batch-rows", "1000").start()
        stop = threading.Event()
        t = threading.Thread(target=_producer, args=(col.base, acked, stop, next_id))
        t.start()
        acked_before = len(acked)
        wait_for(lambda: len(acked) > acked_before, what="an acknowledgement")  # the stream runs, however slowly
        time.sleep(delay)
        col.kill()  # SIGKILL, wherever it is: mid-request, mid-seal, mid-insert
        stop.set()
        t.join()
        next_id += 1_000_000
    with CollectorProcess(tmp_path) as col:
        store = connect(col.query_url)
        sql = "SELECT count(), uniqExact(attributes['seq']) FROM meshlens.calls"
        wait_for(lambda: (lambda r: r[0] >= len(acked))(store.query_rows(sql)[0]), what="replay")
        # everything spooled has landed (a duplicate would show now), however long that took
        wait_for(lambda: "meshlens_collector_spool_bytes 0.0" in collector_metrics(col), what="an empty spool")
        total, unique = store.query_rows(sql)[0]
        assert int(total) == int(unique), "a replayed batch was stored twice"
        stored = {int(r[0]) for r in store.query_rows("SELECT attributes['seq'] FROM meshlens.calls")}
    assert acked, "the producer never got an acknowledgement"
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged calls lost"


def collector_metrics(col: CollectorProcess) -> str:
    with urllib.request.urlopen(f"{col.base}/metrics", timeout=PATIENCE_S) as resp:
        return resp.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_store_server(data: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "writable_chdb_server.py"), str(data), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None
    if b"ready" not in proc.stdout.readline():
        proc.kill()
        raise RuntimeError("store server did not start")
    return proc


def test_store_outage_spools_then_replays_in_order_and_a_full_spool_answers_503(tmp_path):
    port = _free_port()
    store_proc = _start_store_server(tmp_path / "server-data", port)
    try:
        url = f"http://127.0.0.1:{port}/?database=meshlens"
        with CollectorProcess(tmp_path, url, "--spool-max-bytes", "2000000") as col:
            assert post(f"{col.base}/v1/calls", calls_batch(range(0, 100)), batch_format.CONTENT_TYPE)[0] == 200
            store = connect(url)
            wait_for(lambda: count(store, "SELECT count() FROM meshlens.calls") == 100, what="first batch")

            store_proc.kill()
            store_proc.wait()
            accepted, statuses, i = [], [], 100
            while i < 100_000:  # spool until it is full
                status, body, headers = post(f"{col.base}/v1/calls", calls_batch(range(i, i + 500)),
                                             batch_format.CONTENT_TYPE)
                statuses.append(status)
                if status == 200:
                    accepted.extend(range(i, i + 500))
                else:
                    assert status == 503 and int(headers["Retry-After"]) >= 1, (status, body)
                    break
                i += 500
            assert statuses[-1] == 503, "the spool never filled"
            assert "meshlens_collector_spool_errors_total 1.0" in collector_metrics(col)
            wait_for(lambda: "meshlens_collector_store_up 0.0" in collector_metrics(col), what="store_up 0")

            store_proc = _start_store_server(tmp_path / "server-data", port)
            expected = 100 + len(accepted)
            wait_for(lambda: count(store, "SELECT count() FROM meshlens.calls") >= expected, what="replay")
            rows = store.query_rows("SELECT count(), uniqExact(attributes['seq']) FROM meshlens.calls")[0]
            assert int(rows[0]) == int(rows[1]) == expected
            # the collector takes new work again
            assert post(f"{col.base}/v1/calls", calls_batch(range(500_000, 500_010)),
                        batch_format.CONTENT_TYPE)[0] == 200
    finally:
        store_proc.kill()
        store_proc.wait()


# -- start-up errors: one line, exit 2 ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--store", "postgres://x"], "unknown store scheme"),
    (["--store", "http://127.0.0.1:1/"], "cannot reach"),
    (["--store", "chdb:/proc/meshlens-cannot-write-here"], "cannot use data directory"),
    (["--otlp-http-port", "99999"], "otlp_http_port must be"),
    (["--batch-rows", "many"], "invalid int value"),
])
def test_unusable_settings_end_in_one_line_and_exit_code_2(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    proc = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "collector", "--spool-dir",
                           str(tmp_path / "spool"), *args], capture_output=True, text=True, env=env, timeout=PATIENCE_S)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 2 and message in proc.stderr, proc.stderr  # argparse adds a usage line
    assert "Traceback" not in proc.stderr


def test_unwritable_spool_dir_is_one_line_and_exit_code_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "collector", "--spool-dir",
                           str(blocker / "spool"), "--store", f"chdb:{tmp_path / 's'}"],
                          capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 2 and "cannot use spool directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    col = CollectorProcess(tmp_path).start()
    assert post(f"{col.base}/v1/calls", calls_batch(range(50)), batch_format.CONTENT_TYPE)[0] == 200
    assert col.stop() == 0
    with CollectorProcess(tmp_path) as col2:
        store = connect(col2.query_url)
        assert count(store, "SELECT count() FROM meshlens.calls") == 50

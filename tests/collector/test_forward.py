"""--forward-otlp: every accepted span also sent by OTLP/HTTP, received here by a second meshlens collector.

The encoder is checked as a round trip (otel_traces rows -> protobuf -> collector/otlp.py's
decoder -> the same rows); the forwarder's answers to a receiver's 400, 503 and
partial_success against a small aiohttp receiver; the whole path between two collector
processes (A forwarding to B).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from prometheus_client.parser import text_string_to_metric_families

from meshlens.collector import batch_format
from meshlens.collector.columns import to_table
from meshlens.collector.forward import BATCH_SPANS, Forwarder, encode, traces_url
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.otlp import MAX_TIME_NS, SPAN_KINDS, STATUS_CODES, decode_traces
from meshlens.collector.stores import connect
from tests.app_thread import AppThread
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S, wait_until

T0 = 1_700_000_000_000_000_000


# -- the encoder: otel_traces rows -> OTLP -> the decoder -> the same rows -------------


def kv(key: str, **value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def export_request() -> ExportTraceServiceRequest:
    """Two resources, three scopes, every kind and status, events, links, trace state, non-string attributes."""
    req = ExportTraceServiceRequest()
    n = 0
    for service, scopes in (("checkout", ("http", "db")), ("payments", ("grpc",))):
        rs = req.resource_spans.add()
        rs.resource.attributes.extend([kv("service.name", string_value=service), kv("host.name", string_value="h1"),
                                       kv("cores", int_value=2)])
        for scope in scopes:
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = scope, "1.2" if scope != "db" else ""
            for kind in range(6):
                n += 1
                sp = ss.spans.add(trace_id=n.to_bytes(16, "big"), span_id=(n + 100).to_bytes(8, "big"),
                                  parent_span_id=(n + 200).to_bytes(8, "big") if n % 2 else b"",
                                  trace_state="vendor=x" if n % 3 == 0 else "", name=f"op {n}", kind=kind,
                                  start_time_unix_nano=T0 + n, end_time_unix_nano=T0 + n + 1000 * n)
                sp.attributes.extend([kv("http.response.status_code", int_value=200 + n),
                                      kv("ok", bool_value=n % 2 == 0), kv("ratio", double_value=n / 8),
                                      kv("unicode", string_value="héllo ✓"), kv("empty", string_value="")])
                sp.status.code, sp.status.message = n % 3, "failed" if n % 3 == 2 else ""
                if n % 4 == 0:
                    ev = sp.events.add(time_unix_nano=T0 + n + 5, name="exception")
                    ev.attributes.append(kv("exception.type", string_value="ValueError"))
                    sp.events.add(time_unix_nano=T0 + n + 6, name="retry")
                if n % 5 == 0:
                    sp.links.add(trace_id=(n + 7).to_bytes(16, "big"), span_id=(n + 8).to_bytes(8, "big"),
                                 trace_state="a=b").attributes.append(kv("link.kind", string_value="follows"))
                    sp.links.add()  # an empty link: stored with '' ids
    return req


def decoded_table(body: bytes) -> pa.Table:
    return to_table("otel_traces", decode_traces(body, "protobuf").traces)


def round_trip(table: pa.Table) -> pa.Table:
    body, sent, invalid = encode(table)
    assert (sent, invalid) == (table.num_rows, 0)
    return decoded_table(body)


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    """Row for row, whatever order the encoder grouped them in."""
    key = lambda row: row["SpanId"]  # noqa: E731
    assert sorted(got.to_pylist(), key=key) == sorted(want.to_pylist(), key=key)


def test_decoded_spans_encode_back_to_the_same_rows() -> None:
    table = decoded_table(export_request().SerializeToString())
    assert table.num_rows == 18
    assert_same_rows(round_trip(table), table)


def test_a_slice_and_a_table_of_several_chunks_encode_their_own_rows() -> None:
    """The queue slices tables and concatenates pieces: the map columns are read through their offsets."""
    table = decoded_table(export_request().SerializeToString())
    piece = table.slice(5, 7)
    assert_same_rows(round_trip(piece), piece)
    chunked = pa.concat_tables([table.slice(0, 3), table.slice(10, 4), table.slice(16)])
    assert chunked.column("SpanAttributes").num_chunks == 3
    assert_same_rows(round_trip(chunked), chunked)


def test_a_service_name_missing_from_the_resource_is_sent_as_service_name() -> None:
    table = to_table("otel_traces", {"TraceId": ["ab" * 16], "SpanId": ["cd" * 8], "ServiceName": ["web"],
                                     "ResourceAttributes": [[("zone", "a")]], "SpanKind": ["Server"]})
    got = round_trip(table).to_pylist()[0]
    assert got["ServiceName"] == "web"
    assert got["ResourceAttributes"] == [("service.name", "web"), ("zone", "a")]


def test_ids_otlp_cannot_carry_are_left_out_and_counted() -> None:
    good = ("ab" * 16, "cd" * 8, "")
    rows = [good, ("xyz", "cd" * 8, ""), ("ab" * 8, "cd" * 8, ""), ("00" * 16, "cd" * 8, ""),
            ("ab" * 16, "00" * 8, ""), ("ab" * 16, "cd" * 8, "ef"), ("ab" * 16, "cd" * 4, "")]
    table = to_table("otel_traces", {"TraceId": [r[0] for r in rows], "SpanId": [r[1] for r in rows],
                                     "ParentSpanId": [r[2] for r in rows]})
    body, sent, invalid = encode(table)
    assert (sent, invalid) == (1, 6)
    assert decoded_table(body).column("TraceId").to_pylist() == ["ab" * 16]


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_pairs = st.lists(st.tuples(_text, _text), max_size=4)
_hex_id = lambda n: st.binary(min_size=n, max_size=n).filter(any).map(bytes.hex)  # noqa: E731
_time = st.integers(0, MAX_TIME_NS)


@st.composite
def trace_rows(draw: st.DrawFn) -> dict[str, Any]:
    """One otel_traces row as the decoder writes it (resource carrying service.name when ServiceName is set)."""
    service = draw(_text)
    resource = [p for p in draw(_pairs) if p[0] != "service.name"]
    start = draw(_time)
    events = draw(st.lists(st.tuples(_time, _text, _pairs), max_size=2))
    links = draw(st.lists(st.tuples(st.one_of(st.just(""), _hex_id(16)), st.one_of(st.just(""), _hex_id(8)),
                                    _text, _pairs), max_size=2))
    return {
        "Timestamp": start, "TraceId": draw(_hex_id(16)), "SpanId": draw(_hex_id(8)),
        "ParentSpanId": draw(st.one_of(st.just(""), _hex_id(8))), "TraceState": draw(_text),
        "SpanName": draw(_text), "SpanKind": draw(st.sampled_from(sorted(SPAN_KINDS.values()))),
        "ServiceName": service, "ResourceAttributes": ([("service.name", service)] if service else []) + resource,
        "ScopeName": draw(_text), "ScopeVersion": draw(_text), "SpanAttributes": draw(_pairs),
        "Duration": draw(st.integers(0, 2**64 - 1 - start)),
        "StatusCode": draw(st.sampled_from(sorted(STATUS_CODES.values()))), "StatusMessage": draw(_text),
        "Events.Timestamp": [e[0] for e in events], "Events.Name": [e[1] for e in events],
        "Events.Attributes": [e[2] for e in events],
        "Links.TraceId": [ln[0] for ln in links], "Links.SpanId": [ln[1] for ln in links],
        "Links.TraceState": [ln[2] for ln in links], "Links.Attributes": [ln[3] for ln in links],
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(trace_rows(), min_size=1, max_size=6, unique_by=lambda r: r["SpanId"]))
def test_any_row_the_decoder_can_write_round_trips(rows: list[dict[str, Any]]) -> None:
    table = to_table("otel_traces", {name: [r[name] for r in rows] for name in rows[0]})
    assert_same_rows(round_trip(table), table)


# -- the URL -------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "sent_to"), [
    ("http://tempo:4318", "http://tempo:4318/v1/traces"),
    ("http://tempo:4318/", "http://tempo:4318/v1/traces"),
    ("https://gw.example/otlp", "https://gw.example/otlp/v1/traces"),
    ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
])
def test_the_url_is_taken_with_or_without_the_traces_path(url: str, sent_to: str) -> None:
    assert traces_url(url) == sent_to


@pytest.mark.parametrize("url", ["tempo:4318", "ftp://tempo/", "http://", "http://tempo:99999",
                                 "http://tempo:4318/?x=1", "http://tempo:4318/#f", "http://tempo:port/"])
def test_a_url_that_cannot_be_used_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(ValueError, match="^forward_otlp "):
        traces_url(url)


# -- the forwarder against a receiver that is not a collector --------------------------


def sample_spans(n: int, first: int = 1) -> pa.Table:
    return to_table("otel_traces", {"TraceId": [f"{i:032x}" for i in range(first, first + n)],
                                    "SpanId": [f"{i:016x}" for i in range(first, first + n)],
                                    "SpanName": ["op"] * n, "ServiceName": ["svc"] * n,
                                    "ResourceAttributes": [[("service.name", "svc")]] * n})


class Receiver(AppThread):
    """An OTLP/HTTP endpoint that answers each export with the next of `answers` (the last one repeats)."""

    def __init__(self, answers: list[Callable[[int], web.Response]]) -> None:
        self.answers = answers
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, spans) of each export
        self.span_ids: set[str] = set()
        super().__init__(self._app)

    def _app(self) -> web.Application:
        async def export(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            decoded = decode_traces(await request.read(), "protobuf")
            spans = decoded.accepted
            self.arrivals.append((time.monotonic(), spans))
            self.span_ids.update(decoded.traces["SpanId"])
            return self.answers[min(len(self.arrivals), len(self.answers)) - 1](spans)

        app = web.Application()
        app.router.add_post("/v1/traces", export)
        return app


def ok(rejected: int = 0) -> Callable[[int], web.Response]:
    reply = ExportTraceServiceResponse()
    if rejected:
        reply.partial_success.rejected_spans, reply.partial_success.error_message = rejected, "span too old"
    return lambda _: web.Response(body=reply.SerializeToString(), content_type="application/x-protobuf")


def status(code: int, headers: dict[str, str] | None = None) -> Callable[[int], web.Response]:
    return lambda _: web.Response(status=code, text="no", headers=headers)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(*answers: Callable[[int], web.Response]) -> Receiver:
        started.append(Receiver(list(answers)).start())
        return started[-1]

    yield start
    for r in started:
        r.stop()


@pytest.fixture
def forwarders() -> Iterator[Callable[..., tuple[Forwarder, CollectorMetrics]]]:
    started: list[Forwarder] = []

    def start(url: str, max_spans: int = 10_000) -> tuple[Forwarder, CollectorMetrics]:
        metrics = CollectorMetrics()
        started.append(Forwarder(url, metrics, max_spans, timeout=PATIENCE_S))
        started[-1].start()
        return started[-1], metrics

    yield start
    for f in started:
        f.stop(drain=0)


def sample(metrics: CollectorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_spans_go_out_in_batches_and_are_counted(receivers, forwarders) -> None:
    receiver = receivers(ok())
    forwarder, metrics = forwarders(receiver.url)
    forwarder.offer(sample_spans(BATCH_SPANS + 10))
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_spans_total") == BATCH_SPANS + 10, "all sent")
    assert sorted(spans for _, spans in receiver.arrivals) == [10, BATCH_SPANS]
    assert sample(metrics, "meshlens_collector_forward_batches_total") == 2
    assert sample(metrics, "meshlens_collector_forward_queue_spans") == 0


def test_a_400_is_dropped_as_rejected_and_not_retried(receivers, forwarders) -> None:
    receiver = receivers(status(400))
    forwarder, metrics = forwarders(receiver.url)
    forwarder.offer(sample_spans(7))
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_dropped_spans_total", reason="rejected") == 7,
               "7 spans rejected")
    assert len(receiver.arrivals) == 1
    assert sum(s.value for fam in metrics.registry.collect() if fam.name == "meshlens_collector_forward_retries"
               for s in fam.samples if s.name.endswith("_total")) == 0
    assert sample(metrics, "meshlens_collector_forward_spans_total") == 0


def test_a_503_is_retried_after_its_retry_after(receivers, forwarders) -> None:
    receiver = receivers(status(503, {"Retry-After": "1"}), ok())
    forwarder, metrics = forwarders(receiver.url)
    forwarder.offer(sample_spans(5))
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_spans_total") == 5, "5 spans sent")
    assert sample(metrics, "meshlens_collector_forward_retries_total", reason="503") == 1
    (first, _), (second, spans) = receiver.arrivals
    assert spans == 5
    assert second - first >= 0.9  # Retry-After honoured; the backoff alone would be 0.2 s


def test_spans_refused_in_partial_success_are_counted_rejected(receivers, forwarders) -> None:
    receiver = receivers(ok(rejected=2))
    forwarder, metrics = forwarders(receiver.url)
    forwarder.offer(sample_spans(6))
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_batches_total") == 1, "one batch answered")
    assert sample(metrics, "meshlens_collector_forward_spans_total") == 4
    assert sample(metrics, "meshlens_collector_forward_dropped_spans_total", reason="rejected") == 2


def test_spans_beyond_the_bound_are_dropped_newest_first(receivers, forwarders) -> None:
    receiver = receivers(status(503))  # never takes them: everything offered stays held
    forwarder, metrics = forwarders(receiver.url, max_spans=10)
    forwarder.offer(sample_spans(6, first=1))
    forwarder.offer(sample_spans(6, first=7))  # 4 of these fit
    forwarder.offer(sample_spans(3, first=13))
    assert sample(metrics, "meshlens_collector_forward_dropped_spans_total", reason="queue_full") == 5
    assert sample(metrics, "meshlens_collector_forward_queue_spans") == 10
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_retries_total", reason="503") >= 2, "retries")
    receiver.answers = [ok()]
    wait_until(lambda: sample(metrics, "meshlens_collector_forward_spans_total") == 10, "the 10 held sent")
    assert receiver.span_ids == {f"{i:016x}" for i in range(1, 11)}  # the oldest 10, the newest dropped


def test_stop_counts_what_it_could_not_send_as_shutdown(receivers) -> None:
    receiver = receivers(status(503))
    metrics = CollectorMetrics()
    forwarder = Forwarder(receiver.url, metrics, 100, timeout=PATIENCE_S)
    forwarder.start()
    forwarder.offer(sample_spans(8))
    wait_until(lambda: receiver.arrivals, "a first attempt")
    forwarder.stop(drain=0.5)
    assert sample(metrics, "meshlens_collector_forward_dropped_spans_total", reason="shutdown") == 8
    assert sample(metrics, "meshlens_collector_forward_queue_spans") == 0


def test_stop_sends_what_is_queued_when_the_receiver_takes_it(receivers) -> None:
    receiver = receivers(ok())
    metrics = CollectorMetrics()
    forwarder = Forwarder(receiver.url, metrics, 10_000, timeout=PATIENCE_S)
    forwarder.start()
    forwarder.offer(sample_spans(3))  # below a batch: it would wait SEND_DELAY_S
    forwarder.stop(drain=PATIENCE_S)
    assert sample(metrics, "meshlens_collector_forward_spans_total") == 3
    assert sample(metrics, "meshlens_collector_forward_dropped_spans_total", reason="shutdown") == 0


# -- two collectors: A forwards to B ---------------------------------------------------


def metric(col: CollectorProcess, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{col.base}/metrics", timeout=PATIENCE_S).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def post(url: str, body: bytes, ctype: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=PATIENCE_S) as resp:
        return resp.status


def query(col: CollectorProcess, sql: str) -> list[tuple[Any, ...]]:
    store = connect(col.query_url)
    try:
        return store.query_rows(sql)
    finally:
        store.close()


def wait_spans(col: CollectorProcess, n: int, what: str) -> list[tuple[Any, ...]]:
    """Every column of the `n` spans `col` stored, once it has them all."""
    def stored() -> list[tuple[Any, ...]] | None:
        got = query(col, "SELECT * FROM meshlens.otel_traces ORDER BY TraceId, SpanId")
        return got if len(got) == n else None
    return wait_until(stored, what)


def send_sdk_spans(col: CollectorProcess, service: str, count: int) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    provider = TracerProvider(resource=Resource.create({"service.name": service, "deployment.environment": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{col.base}/v1/traces")))
    tracer = provider.get_tracer("forward-test", "0.1")
    for i in range(count):
        with tracer.start_as_current_span("GET /orders/{id}", kind=SpanKind.SERVER,
                                          attributes={"http.request.method": "GET", "url.path": f"/orders/{i}",
                                                      "http.route": "/orders/{id}",
                                                      "http.response.status_code": 200}) as server:
            with tracer.start_as_current_span("lookup", attributes={"db.system": "none", "i": i}) as child:
                child.add_event("cache miss", {"key": str(i)})
                child.set_status(Status(StatusCode.ERROR, "not found"))
            server.add_link(child.get_span_context(), {"why": "test"})
    provider.shutdown()


def calls_batch(n: int, batch_id: str | None = None) -> bytes:
    return batch_format.encode({
        "time": [time.time_ns() + i for i in range(n)], "duration_ns": [2_000_000] * n,
        "observer": ["client"] * n, "src_service": ["frontend"] * n, "dst_service": ["checkout"] * n,
        "protocol": ["http/1.1"] * n, "method": ["GET"] * n, "path": [f"/items/{i}" for i in range(n)],
        "status": [200] * n, "trace_id": [f"{i + 1:032x}" for i in range(n)],
        "span_id": [f"{i + 1:016x}" for i in range(n)], "attributes": [{"seq": str(i)} for i in range(n)],
    }, batch_id)


def refusing_port() -> socket.socket:
    """A loopback port bound and not listening: every connection to it is refused, and no one else takes it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


class Collector(CollectorProcess):
    """A collector process that keeps its ready line."""

    ready_line = ""

    def launch(self, args: list[str], ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        m = super().launch(args, ready, timeout)
        self.ready_line = m.string
        return m


def test_spans_accepted_by_a_arrive_in_b_as_they_were_stored_in_a(tmp_path: Path) -> None:
    """The SDK's spans and the spans made from call records: B stores the rows A stored, column for column."""
    with Collector(tmp_path / "b") as b, Collector(tmp_path / "a", None, "--forward-otlp", b.base) as a:
        assert "forward=off" in b.ready_line
        assert f"forward={b.base}/v1/traces" in a.ready_line
        send_sdk_spans(a, "orders", 3)
        batch = calls_batch(4, "producer-1")
        assert post(f"{a.base}/v1/calls", batch, batch_format.CONTENT_TYPE) == 200
        assert post(f"{a.base}/v1/calls", batch, batch_format.CONTENT_TYPE) == 200  # a resend: not forwarded again
        stored_in_a = wait_spans(a, 10, "10 spans in A")
        assert wait_spans(b, 10, "10 spans in B") == stored_in_a
        names = {(r[7], r[5], r[6]) for r in stored_in_a}  # ServiceName, SpanName, SpanKind
        assert names == {("orders", "GET /orders/{id}", "Server"), ("orders", "lookup", "Internal"),
                         ("frontend", "GET", "Client")}
        wait_until(lambda: metric(a, "meshlens_collector_forward_queue_spans") == 0, "A's queue empty")
        assert metric(a, "meshlens_collector_forward_spans_total") == 10
        assert metric(a, "meshlens_collector_forward_dropped_spans_total") == 0
        assert query(b, "SELECT count() FROM meshlens.otel_traces") == [(10,)]


def test_while_b_is_down_a_keeps_accepting_and_b_gets_the_spans_once_it_is_up(tmp_path: Path) -> None:
    held = refusing_port()
    port = held.getsockname()[1]
    with CollectorProcess(tmp_path / "a", None, "--forward-otlp", f"http://127.0.0.1:{port}/v1/traces") as a:
        send_sdk_spans(a, "orders", 2)
        assert post(f"{a.base}/v1/calls", calls_batch(3), batch_format.CONTENT_TYPE) == 200
        stored_in_a = wait_spans(a, 7, "A's own 7 spans")  # A's inserts go on while its forwarding fails
        wait_until(lambda: metric(a, "meshlens_collector_forward_retries_total", reason="unreachable") >= 2,
                   "A retrying")
        assert metric(a, "meshlens_collector_forward_queue_spans") == 7
        held.close()
        with CollectorProcess(tmp_path / "b", None, "--otlp-http-port", str(port)) as b:
            assert wait_spans(b, 7, "the 7 queued spans in B") == stored_in_a
            wait_until(lambda: metric(a, "meshlens_collector_forward_queue_spans") == 0, "A's queue empty")
            assert metric(a, "meshlens_collector_forward_spans_total") == 7


def test_past_the_queue_bound_a_drops_and_counts_and_still_accepts(tmp_path: Path) -> None:
    held = refusing_port()
    try:
        url = f"http://user:secret@127.0.0.1:{held.getsockname()[1]}"
        with Collector(tmp_path / "a", None, "--forward-otlp", url, "--forward-queue-spans", "5") as a:
            assert f"forward=http://user:***@127.0.0.1:{held.getsockname()[1]}/v1/traces" in a.ready_line
            for i in range(3):
                assert post(f"{a.base}/v1/calls", calls_batch(4), batch_format.CONTENT_TYPE) == 200
            assert metric(a, "meshlens_collector_forward_dropped_spans_total", reason="queue_full") == 7
            assert metric(a, "meshlens_collector_forward_queue_spans") == 5
            wait_until(lambda: query(a, "SELECT count() FROM meshlens.calls") == [(12,)], "A's 12 calls stored")
            assert a.stop() == 0
        assert "stopped with spans not forwarded" in a.log.read_text()  # the 5 held, counted `shutdown`
    finally:
        held.close()


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--forward-otlp", "ftp://tempo"], {}, "--forward-otlp: forward_otlp must be http(s)://host[:port][/path]"),
    (["--forward-otlp", "http://tempo:x"], {}, "--forward-otlp: forward_otlp 'http://tempo:x' is not a URL"),
    ([], {"MESHLENS_FORWARD_OTLP": "tempo:4318"}, "MESHLENS_FORWARD_OTLP: forward_otlp must be"),
    (["--forward-otlp", "http://tempo:4318", "--forward-queue-spans", "0"], {},
     "--forward-queue-spans: forward_queue_spans must be positive, got 0"),
    (["--forward-otlp", "http://tempo:4318", "--forward-timeout", "-1"], {},
     "--forward-timeout: forward_timeout must be positive, got -1.0"),
    (["--forward-queue-spans", "many"], {}, "argument --forward-queue-spans: invalid int value: 'many'"),
])
def test_bad_forward_settings_are_one_line_at_start(tmp_path: Path, args: list[str], env: dict[str, str],
                                                    message: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")} | env
    done = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "collector", "--store", f"chdb:{tmp_path}/s",
                           "--spool-dir", str(tmp_path / "spool"), "--otlp-http-port", "0", "--otlp-grpc-port", "0",
                           "--query-port", "-1", *args], capture_output=True, text=True, env=environ,
                          timeout=PATIENCE_S)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

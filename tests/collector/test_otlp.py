"""collector/otlp.py: OTLP bodies in, `otel_traces` and `calls` columns out."""
from __future__ import annotations

import base64
import json
import math

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from meshlens.collector.columns import TRACES_COLUMNS, to_table
from meshlens.collector.otlp import ROW_COLUMNS, Decoded, OTLPDecodeError, decode_request, decode_traces
from meshlens.collector.record import CALL_COLUMN_NAMES
from meshlens.collector.spans import OTLP_CALL_COLUMNS

T0 = 1_700_000_000_000_000_000
TID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SID = bytes.fromhex("eee19b7ec3c1b174")
PID = bytes.fromhex("eee19b7ec3c1b173")


# -- building input ------------------------------------------------------------------

def any_value(v: object) -> AnyValue:
    out = AnyValue()
    if isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, int):
        out.int_value = v
    elif isinstance(v, float):
        out.double_value = v
    elif isinstance(v, str):
        out.string_value = v
    elif isinstance(v, bytes):
        out.bytes_value = v
    elif isinstance(v, list):
        out.array_value.values.extend(any_value(x) for x in v)
    elif isinstance(v, dict):
        out.kvlist_value.values.extend(KeyValue(key=k, value=any_value(x)) for k, x in v.items())
    return out


def kvs(attrs: dict[str, object]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def request(*spans: trace_pb2.Span, resource: dict[str, object] | None = None,
            scope: tuple[str, str] = ("scope", "1.0")) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(kvs({"service.name": "orders"} if resource is None else resource))
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = scope
    ss.spans.extend(spans)
    return req


def span(kind: int = trace_pb2.Span.SPAN_KIND_SERVER, attrs: dict[str, object] | None = None,
         **fields: object) -> trace_pb2.Span:
    fields = {"trace_id": TID, "span_id": SID, "name": "op", "start_time_unix_nano": T0,
              "end_time_unix_nano": T0 + 1500, **fields}
    sp = trace_pb2.Span(kind=kind, **fields)
    sp.attributes.extend(kvs(attrs or {}))
    return sp


def decode_pb(req: ExportTraceServiceRequest) -> Decoded:
    d = decode_traces(req.SerializeToString(), "protobuf")
    assert_tables(d)
    return d


def assert_tables(d: Decoded) -> None:
    """Whatever the decoder returns must become Arrow tables of both schemas."""
    traces = to_table("otel_traces", d.traces)
    assert traces.num_rows == d.accepted
    if d.calls:
        to_table("calls", d.calls)


def otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the spec wants it: protobuf JSON mapping, but ids in hex."""
    doc = json.loads(json_format.MessageToJson(req))
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for holder in [sp, *sp.get("links", [])]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in holder:
                            holder[key] = base64.b64decode(holder[key]).hex()
    return json.dumps(doc).encode()


def row(d: Decoded, i: int = 0) -> dict[str, object]:
    return {k: v[i] for k, v in d.traces.items()}


def call(d: Decoded, i: int = 0) -> dict[str, object]:
    return {k: v[i] for k, v in d.calls.items()}


def sdk_request() -> tuple[ExportTraceServiceRequest, list]:
    """Real SDK spans, encoded by the SDK's own OTLP encoder."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout",
                                                        "service.instance.id": "checkout-7f9c"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shop.http", "2.1.0")
    with tracer.start_as_current_span(
            "GET /orders/{id}", kind=SpanKind.SERVER,
            attributes={"http.request.method": "GET", "url.path": "/orders/7", "http.route": "/orders/{id}",
                        "http.response.status_code": 200, "server.address": "checkout", "server.port": 8080,
                        "client.address": "10.0.0.7", "network.protocol.version": "1.1",
                        "app.tags": ["a", "b"], "app.ratio": 0.25, "app.cached": False}) as server:
        server.add_event("cache miss", {"key": "orders/7", "size": 3})
        with tracer.start_as_current_span(
                "GET", kind=SpanKind.CLIENT,
                attributes={"http.request.method": "GET", "url.full": "https://inventory:443/stock/7?x=1",
                            "server.address": "inventory", "server.port": 443, "peer.service": "inventory",
                            "http.response.status_code": 503, "error.type": "503"},
                links=[Link(server.get_span_context(), {"why": "retry"})]) as client:
            client.set_status(Status(StatusCode.ERROR, "upstream unavailable"))
        with tracer.start_as_current_span("render", kind=SpanKind.INTERNAL):
            pass
    provider.shutdown()
    spans = list(exporter.get_finished_spans())
    return encode_spans(spans), spans


# -- the exporter's columns ---------------------------------------------------------

def test_a_span_becomes_the_row_the_clickhouse_exporter_writes():
    sp = span(attrs={"http.request.method": "GET", "retries": 2, "ok": True, "ratio": 0.5},
              parent_span_id=PID, trace_state="k=v", end_time_unix_nano=T0 + 2_000_000)
    sp.status.code, sp.status.message = trace_pb2.Status.STATUS_CODE_ERROR, "boom"
    ev = sp.events.add(time_unix_nano=T0 + 5, name="exception")
    ev.attributes.extend(kvs({"exception.type": "ValueError"}))
    link = sp.links.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), trace_state="a=b")
    link.attributes.extend(kvs({"n": 1}))
    sp.links.add()  # empty ids are written as '' as the exporter does
    d = decode_pb(request(sp, resource={"service.name": "orders", "service.instance.id": "orders-1", "pid": 42},
                          scope=("io.opentelemetry.http", "1.2.3")))
    assert (d.accepted, d.rejected, d.error) == (1, 0, "")
    assert row(d) == {
        "Timestamp": T0,
        "TraceId": "5b8efff798038103d269b633813fc60c",
        "SpanId": "eee19b7ec3c1b174",
        "ParentSpanId": "eee19b7ec3c1b173",
        "TraceState": "k=v",
        "SpanName": "op",
        "SpanKind": "Server",
        "ServiceName": "orders",
        "ResourceAttributes": (("service.name", "orders"), ("service.instance.id", "orders-1"), ("pid", "42")),
        "ScopeName": "io.opentelemetry.http",
        "ScopeVersion": "1.2.3",
        "SpanAttributes": (("http.request.method", "GET"), ("retries", "2"), ("ok", "true"), ("ratio", "0.5")),
        "Duration": 2_000_000,
        "StatusCode": "Error",
        "StatusMessage": "boom",
        "Events.Timestamp": [T0 + 5],
        "Events.Name": ["exception"],
        "Events.Attributes": [(("exception.type", "ValueError"),)],
        "Links.TraceId": ["0102030405060708090a0b0c0d0e0f10", ""],
        "Links.SpanId": ["0102030405060708", ""],
        "Links.TraceState": ["a=b", ""],
        "Links.Attributes": [(("n", "1"),), ()],
    }


def test_row_columns_are_the_otel_traces_columns_and_call_columns_are_calls_columns():
    assert sorted(ROW_COLUMNS) == sorted(TRACES_COLUMNS)
    assert set(OTLP_CALL_COLUMNS) <= set(CALL_COLUMN_NAMES)


@pytest.mark.parametrize("kind, word", [(0, "Unspecified"), (1, "Internal"), (2, "Server"), (3, "Client"),
                                        (4, "Producer"), (5, "Consumer"), (9, "")])
def test_span_kinds_are_words_and_unknown_kinds_empty(kind, word):
    assert decode_pb(request(span(kind=kind))).traces["SpanKind"] == [word]


@pytest.mark.parametrize("code, word", [(0, "Unset"), (1, "Ok"), (2, "Error"), (7, "")])
def test_status_codes_are_words(code, word):
    sp = span()
    sp.status.code = code
    assert decode_pb(request(sp)).traces["StatusCode"] == [word]


def test_no_service_name_is_empty_and_end_before_start_is_zero_duration():
    d = decode_pb(request(span(end_time_unix_nano=T0 - 1), resource={"host.name": "n1"}))
    assert (d.traces["ServiceName"], d.traces["Duration"]) == ([""], [0])


def test_non_string_service_name_is_its_string_form():
    assert decode_pb(request(span(), resource={"service.name": 7})).traces["ServiceName"] == ["7"]


@pytest.mark.parametrize("value, text", [
    ("plain", "plain"), ("", ""), (0, "0"), (-42, "-42"), (2**63 - 1, "9223372036854775807"),
    (True, "true"), (False, "false"), (b"\x00\xff", "AP8="),
    (0.5, "0.5"), (1.0, "1"), (-0.0, "-0"), (123456789.0, "123456789"), (1e20, "100000000000000000000"),
    (1e21, "1e+21"), (1.5e-7, "1.5e-7"), (1e-6, "0.000001"), (5e-324, "5e-324"),
    (math.inf, "json: unsupported value: +Inf"), (math.nan, "json: unsupported value: NaN"),
    ([1, "a", True, 1.0, None], '[1,"a",true,1,null]'),
    ({"b": 1, "a": "<&>"}, '{"a":"\\u003c\\u0026\\u003e","b":1}'),
    ({"nested": [{"x": b"\x01"}], "f": 2.5}, '{"f":2.5,"nested":[{"x":"AQ=="}]}'),
    ([1.0, math.nan], ""),  # Go's json.Marshal refuses NaN; pdata then renders ''
    ([], "[]"), ({}, "{}"),
])
def test_attribute_values_render_like_pdata_as_string(value, text):
    kv = KeyValue(key="k", value=AnyValue() if value is None else any_value(value))
    sp = span()
    sp.attributes.append(kv)
    assert decode_pb(request(sp)).traces["SpanAttributes"] == [(("k", text),)]


def test_spans_from_the_sdk_encoder_decode_to_their_ids_names_times_and_attributes():
    req, spans = sdk_request()
    d = decode_pb(req)
    assert (d.accepted, d.rejected) == (3, 0)
    by_name = {row(d, i)["SpanName"]: row(d, i) for i in range(d.accepted)}
    for s in spans:
        r = by_name[s.name]
        assert r["TraceId"] == f"{s.context.trace_id:032x}" and r["SpanId"] == f"{s.context.span_id:016x}"
        assert r["ParentSpanId"] == (f"{s.parent.span_id:016x}" if s.parent else "")
        assert r["Timestamp"] == s.start_time and r["Duration"] == s.end_time - s.start_time
        assert r["ServiceName"] == "checkout" and (r["ScopeName"], r["ScopeVersion"]) == ("shop.http", "2.1.0")
    server, client = by_name["GET /orders/{id}"], by_name["GET"]
    assert server["SpanKind"] == "Server" and client["SpanKind"] == "Client"
    assert by_name["render"]["SpanKind"] == "Internal"
    attrs = dict(server["SpanAttributes"])
    assert attrs["app.tags"] == '["a","b"]' and attrs["app.ratio"] == "0.25" and attrs["app.cached"] == "false"
    assert attrs["http.response.status_code"] == "200"
    assert server["Events.Name"] == ["cache miss"]
    assert server["Events.Attributes"] == [(("key", "orders/7"), ("size", "3"))]
    assert (client["StatusCode"], client["StatusMessage"]) == ("Error", "upstream unavailable")
    assert client["Links.SpanId"] == [server["SpanId"]] and client["Links.Attributes"] == [(("why", "retry"),)]
    assert ("service.instance.id", "checkout-7f9c") in server["ResourceAttributes"]
    calls = {(c := call(d, i))["span_id"]: c for i in range(len(d.calls["span_id"]))}
    assert set(calls) == {server["SpanId"], client["SpanId"]}
    inbound, outbound = calls[server["SpanId"]], calls[client["SpanId"]]
    assert {k: inbound[k] for k in ("src_service", "dst_service", "observer_id", "src_addr", "authority", "path",
                                    "route", "status", "method", "parent_span_id")} == {
        "src_service": "", "dst_service": "checkout", "observer_id": "checkout-7f9c", "src_addr": "10.0.0.7",
        "authority": "checkout:8080", "path": "/orders/7", "route": "/orders/{id}", "status": 200,
        "method": "GET", "parent_span_id": ""}
    assert {k: outbound[k] for k in ("src_service", "src_instance", "dst_service", "authority", "path", "status",
                                     "tls", "error", "parent_span_id")} == {
        "src_service": "checkout", "src_instance": "checkout-7f9c", "dst_service": "inventory",
        "authority": "inventory", "path": "/stock/7", "status": 503, "tls": True, "error": "",
        "parent_span_id": server["SpanId"]}


def test_the_sdk_body_as_otlp_json_decodes_to_the_same_columns():
    req, _ = sdk_request()
    from_pb = decode_traces(req.SerializeToString(), "protobuf")
    from_json = decode_traces(otlp_json(req), "json")
    assert_tables(from_json)
    assert from_json.traces == from_pb.traces and from_json.calls == from_pb.calls


def test_decode_request_is_decode_traces_without_the_parse():
    req, _ = sdk_request()
    assert decode_request(req) == decode_traces(req.SerializeToString(), "protobuf")


def test_an_empty_export_is_zero_spans():
    d = decode_traces(b"", "protobuf")
    assert (d.accepted, d.rejected, d.calls) == (0, 0, {})
    assert d.traces == {name: [] for name in ROW_COLUMNS}
    assert decode_traces(b"{}", "json").accepted == 0


# -- rejected spans and bad bodies ------------------------------------------------------

def test_spans_with_unusable_ids_are_rejected_one_by_one_and_counted():
    good = [span(attrs={"http.request.method": "GET"}), span(trace_id=b"\x07" * 16, span_id=b"\x08" * 8)]
    bad = [span(trace_id=b""), span(trace_id=bytes(16)), span(trace_id=b"\x01" * 15),
           span(span_id=bytes(8)), span(span_id=b"\x01" * 9), span(parent_span_id=b"\x01" * 4),
           span(start_time_unix_nano=2**63)]
    d = decode_pb(request(bad[0], good[0], *bad[1:], good[1]))
    assert (d.accepted, d.rejected) == (2, 7)
    assert d.traces["SpanId"] == [SID.hex(), "08" * 8]
    assert d.calls["span_id"] == [SID.hex()]
    assert d.error == ("7 span(s) rejected: parent_span_id must be empty or 8 bytes (1); span_id is all zero (1); "
                       "span_id must be 8 bytes (1); start time after 2262 (1); trace_id is all zero (1); "
                       "trace_id must be 16 bytes (2)")
    assert "\n" not in d.error


def test_an_all_zero_parent_is_written_as_no_parent():
    assert decode_pb(request(span(parent_span_id=bytes(8)))).traces["ParentSpanId"] == [""]


def test_a_span_with_an_event_after_2262_is_rejected():
    sp = span()
    sp.events.add(time_unix_nano=2**64 - 1, name="late")
    d = decode_pb(request(sp, span(span_id=b"\x02" * 8)))
    assert (d.accepted, d.rejected, d.error) == (1, 1, "1 span(s) rejected: event time after 2262 (1)")


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff garbage", b"\x0a\x05\x0a", b"\x0a\x02\x12\x00\x0a",
                                  request(span()).SerializeToString()[:-3]])
def test_malformed_protobuf_raises_a_one_line_decode_error(body):
    with pytest.raises(OTLPDecodeError) as e:
        decode_traces(body, "protobuf")
    assert str(e.value).startswith("invalid OTLP protobuf") and "\n" not in str(e.value)


def test_a_malformed_nested_attribute_is_a_decode_error_too():
    good = b"\x0a\x01k\x12\x07\x0a\x05vvvvv"  # key "k", string value "vvvvv"
    assert KeyValue.FromString(good).value.string_value == "vvvvv"
    body = request(span(attrs={"k": "vvvvv"})).SerializeToString()
    broken = body.replace(good, b"\x0a\x01k\x12\x07\x0a\x09vvvvv")  # the string claims 9 bytes of 5
    with pytest.raises(OTLPDecodeError, match="invalid OTLP protobuf"):
        decode_traces(broken, "protobuf")


@pytest.mark.parametrize("body, message", [
    (b'{"resourceSpans": [', "invalid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"resourceSpans": 5}', "invalid OTLP/JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5}]}]}]}', "invalid OTLP/JSON"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "not hex"}]}]}]}', "traceId 'not hex' is not a hex"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}', "invalid OTLP/JSON"),
    (b"\xff\xfe\x00", "invalid JSON"),
])
def test_malformed_json_raises_a_one_line_decode_error(body, message):
    with pytest.raises(OTLPDecodeError) as e:
        decode_traces(body, "json")
    assert message in str(e.value) and "\n" not in str(e.value)


# -- OTLP/JSON specifics ----------------------------------------------------------------

SPEC_EXAMPLE = b"""{
  "resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
    "scopeSpans": [{
      "scope": {"name": "my.library", "version": "1.0.0",
                "attributes": [{"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}]},
      "spans": [{
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "parentSpanId": "EEE19B7EC3C1B173",
        "name": "I'm a server span",
        "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000,
        "kind": 2,
        "attributes": [
          {"key": "my.span.attr", "value": {"stringValue": "some value"}},
          {"key": "http.request.method", "value": {"stringValue": "GET"}},
          {"key": "http.response.status_code", "value": {"intValue": "200"}},
          {"key": "retries", "value": {"intValue": 3}},
          {"key": "sampled", "value": {"boolValue": true}},
          {"key": "blob", "value": {"bytesValue": "AP8="}},
          {"key": "list", "value": {"arrayValue": {"values": [{"stringValue": "x"}, {"doubleValue": 2.5}]}}}
        ],
        "events": [{"timeUnixNano": "1544712660500000000", "name": "checkpoint"}],
        "links": [{"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708"}],
        "status": {"code": "STATUS_CODE_OK", "message": "fine"}
      }]
    }]
  }]
}"""


def test_a_hand_written_otlp_json_body_in_the_spec_style():
    d = decode_traces(SPEC_EXAMPLE, "json")
    assert_tables(d)
    assert row(d) == {
        "Timestamp": 1544712660000000000, "TraceId": "5b8efff798038103d269b633813fc60c",
        "SpanId": "eee19b7ec3c1b174", "ParentSpanId": "eee19b7ec3c1b173", "TraceState": "",
        "SpanName": "I'm a server span", "SpanKind": "Server", "ServiceName": "my.service",
        "ResourceAttributes": (("service.name", "my.service"),), "ScopeName": "my.library", "ScopeVersion": "1.0.0",
        "SpanAttributes": (("my.span.attr", "some value"), ("http.request.method", "GET"),
                           ("http.response.status_code", "200"), ("retries", "3"), ("sampled", "true"),
                           ("blob", "AP8="), ("list", '["x",2.5]')),
        "Duration": 1_000_000_000, "StatusCode": "Ok", "StatusMessage": "fine",
        "Events.Timestamp": [1544712660500000000], "Events.Name": ["checkpoint"], "Events.Attributes": [()],
        "Links.TraceId": ["0102030405060708090a0b0c0d0e0f10"], "Links.SpanId": ["0102030405060708"],
        "Links.TraceState": [""], "Links.Attributes": [()],
    }
    assert (d.calls["method"], d.calls["status"], d.calls["dst_service"]) == (["GET"], [200], ["my.service"])


def test_unknown_json_fields_are_ignored_and_snake_case_keys_and_enum_names_accepted():
    doc = {"resource_spans": [{"futureField": 1, "scope_spans": [{"spans": [{
        "trace_id": TID.hex(), "span_id": SID.hex(), "name": "j", "kind": "SPAN_KIND_CLIENT",
        "start_time_unix_nano": T0, "end_time_unix_nano": str(T0 + 9), "status": {"code": 2},
        "somethingNew": {"x": [1, 2]}}]}]}], "extra": True}
    d = decode_traces(json.dumps(doc).encode(), "json")
    assert (d.accepted, d.traces["SpanKind"], d.traces["Duration"], d.traces["StatusCode"]) == (
        1, ["Client"], [9], ["Error"])


def test_json_ids_of_the_wrong_length_are_rejected_per_span_like_protobuf():
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "00" * 16, "spanId": SID.hex()}, {"traceId": TID.hex(), "spanId": "ab"},
        {"spanId": SID.hex()}, {"traceId": TID.hex(), "spanId": SID.hex()}]}]}]}
    d = decode_traces(json.dumps(doc).encode(), "json")
    assert (d.accepted, d.rejected) == (1, 3)


# -- fuzzing: only OTLPDecodeError, and tables that always build --------------------------

def decode_or_refuse(body: bytes, kind: str) -> None:
    try:
        d = decode_traces(body, kind)
    except OTLPDecodeError as e:
        assert "\n" not in str(e)
        return
    assert_tables(d)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_only_decode_error(body):
    decode_or_refuse(body, "protobuf")


SDK_BODY = sdk_request()[0].SerializeToString()
SDK_JSON = otlp_json(ExportTraceServiceRequest.FromString(SDK_BODY))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_real_bodies_decode_or_raise_only_decode_error(data):
    """Bytes of the SDK's body overwritten at random: reaches far deeper than random bytes do."""
    kind, body = data.draw(st.sampled_from([("protobuf", SDK_BODY), ("json", SDK_JSON)]))
    corrupted = bytearray(body)
    values = st.integers(0, 255) if kind == "protobuf" else st.integers(32, 126)
    for at, byte in data.draw(st.lists(st.tuples(st.integers(0, len(body) - 1), values), min_size=1, max_size=4)):
        corrupted[at] = byte
    decode_or_refuse(bytes(corrupted), kind)


attribute_values = st.recursive(
    st.one_of(st.text(max_size=8), st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
              st.binary(max_size=8), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
attribute_keys = st.sampled_from(["http.request.method", "http.method", "url.full", "http.url", "url.path",
                                  "http.target", "server.port", "client.port", "rpc.system", "rpc.grpc.status_code",
                                  "error.type", "service.name", "x"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from([TID, bytes(16), b"\x01" * 15, b""]), st.sampled_from([SID, bytes(8), b"\x02" * 7]),
    st.sampled_from([b"", PID, bytes(8), b"\x03"]), st.integers(0, 2**31 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1), st.text(max_size=10), st.dictionaries(attribute_keys, attribute_values, max_size=6),
    st.integers(0, 2**31 - 1)), max_size=5),
    st.dictionaries(st.text(max_size=6), attribute_values, max_size=3))
def test_arbitrary_well_formed_spans_always_make_tables_that_build(spans, resource):
    built = []
    for tid, sid, pid, kind, start, end, name, attrs, code in spans:
        sp = span(kind=kind, attrs=attrs, trace_id=tid, span_id=sid, parent_span_id=pid, name=name,
                  start_time_unix_nano=start, end_time_unix_nano=end)
        sp.status.code = code
        built.append(sp)
    req = request(*built, resource=resource)
    d = decode_pb(req)
    assert d.accepted + d.rejected == len(spans)
    assert decode_traces(otlp_json(req), "json") == d


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
span_fields = st.dictionaries(
    st.sampled_from(["traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano", "endTimeUnixNano",
                     "attributes", "events", "links", "status", "traceState", "other"]),
    st.one_of(json_values, st.just(TID.hex()), st.just(SID.hex()),
              st.just([{"key": "k", "value": {"stringValue": "v"}}])), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["resourceSpans", "resource_spans", "x"]), json_values, max_size=2),
    st.lists(span_fields, max_size=3).map(lambda spans: {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}),
))
def test_arbitrary_json_decodes_or_raises_only_decode_error(doc):
    decode_or_refuse(json.dumps(doc).encode(), "json")

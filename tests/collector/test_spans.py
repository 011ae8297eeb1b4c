"""collector/spans.py: spans in, call rows out; call records with trace context in, spans out."""
from __future__ import annotations

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from meshlens.collector.columns import to_table
from meshlens.collector.otlp import Decoded
from meshlens.collector.record import CALL_COLUMN_NAMES
from meshlens.collector.spans import CALL_SPAN_COLUMNS, OTLP_CALL_COLUMNS, calls_to_spans, spans_to_calls
from tests.collector.test_otlp import SID, T0, TID, decode_pb, request, span

TRACE = "5b8efff798038103d269b633813fc60c"


def call(d: Decoded, i: int = 0) -> dict[str, object]:
    return {k: v[i] for k, v in d.calls.items()}


# -- spans_to_calls: OTLP spans (old and new semconv names) in, call rows out ------------

CALL_DEFAULTS = {"observer": "otlp", "trace_id": TID.hex(), "span_id": SID.hex(), "parent_span_id": "",
                 "time": T0, "duration_ns": 1500, "grpc_status": -1, "tls": False, "error": "",
                 "attributes": (("span.name", "op"),)}


def expect_call(**fields: object) -> dict[str, object]:
    base = {name: "" for name in OTLP_CALL_COLUMNS}
    base.update({"src_port": 0, "dst_port": 0, "status": 0, "request_bytes": 0, "response_bytes": 0})
    base.update(CALL_DEFAULTS)
    base.update(fields)
    return base


RESOURCE = {"service.name": "orders", "service.instance.id": "orders-5d8f"}


def test_server_span_with_current_semconv_names_is_a_call_into_its_service():
    d = decode_pb(request(span(attrs={
        "http.request.method": "POST", "url.path": "/orders", "url.query": "dry=1", "url.scheme": "http",
        "http.route": "/orders", "http.response.status_code": 201, "server.address": "orders.shop",
        "server.port": 8080, "client.address": "10.1.2.3", "client.port": 51234,
        "network.protocol.version": "2", "http.request.body.size": 120, "http.response.body.size": 64,
        "user_agent.original": "curl/8"}), resource=RESOURCE))
    assert call(d) == expect_call(
        observer_id="orders-5d8f", dst_service="orders", src_addr="10.1.2.3", src_port=51234, dst_port=8080,
        protocol="h2", method="POST", authority="orders.shop:8080", path="/orders", route="/orders", status=201,
        request_bytes=120, response_bytes=64)


def test_server_span_with_old_semconv_names_maps_the_same_way():
    d = decode_pb(request(span(attrs={
        "http.method": "GET", "http.target": "/orders/7?verbose=1", "http.status_code": 404,
        "http.flavor": "1.1", "http.scheme": "http", "net.host.name": "orders.shop", "net.host.port": 80,
        "net.sock.peer.addr": "10.9.8.7", "net.sock.peer.port": 40000, "http.request_content_length": 0,
        "http.response_content_length": 9, "http.route": "/orders/{id}"}), resource={"service.name": "orders",
                                                                                      "host.name": "node-3"}))
    assert call(d) == expect_call(
        observer_id="node-3", dst_service="orders", src_addr="10.9.8.7", src_port=40000, dst_port=80,
        protocol="http/1.1", method="GET", authority="orders.shop", path="/orders/7", route="/orders/{id}",
        status=404, response_bytes=9)


def test_client_span_with_current_semconv_names_is_a_call_from_its_service():
    d = decode_pb(request(span(kind=trace_pb2.Span.SPAN_KIND_CLIENT, attrs={
        "http.request.method": "GET", "url.full": "https://inventory.shop/stock/7?x=1",
        "server.address": "inventory.shop", "server.port": 443, "network.peer.address": "10.0.0.9",
        "network.peer.port": 443, "peer.service": "inventory", "http.response.status_code": 503,
        "error.type": "503"}), resource=RESOURCE))
    # A 5xx is a status, not an error class: error stays ''.
    assert call(d) == expect_call(
        observer_id="orders-5d8f", src_service="orders", src_instance="orders-5d8f", dst_service="inventory",
        dst_addr="10.0.0.9", dst_port=443, protocol="http/1.1", method="GET", authority="inventory.shop",
        path="/stock/7", status=503, tls=True)


def test_client_span_with_old_semconv_names_maps_the_same_way():
    d = decode_pb(request(span(kind=trace_pb2.Span.SPAN_KIND_CLIENT, attrs={
        "http.method": "PUT", "http.url": "http://inventory:8080/stock/7?x=1", "net.peer.name": "inventory",
        "net.peer.port": 8080, "http.status_code": 200, "http.flavor": "2.0"}), resource=RESOURCE))
    assert call(d) == expect_call(
        observer_id="orders-5d8f", src_service="orders", src_instance="orders-5d8f", dst_service="inventory",
        dst_port=8080, protocol="h2", method="PUT", authority="inventory:8080", path="/stock/7", status=200)


def test_client_span_error_type_timeouts_become_the_timeout_class_and_keep_the_original():
    d = decode_pb(request(span(kind=trace_pb2.Span.SPAN_KIND_CLIENT, attrs={
        "http.request.method": "GET", "url.full": "http://pay/charge",
        "error.type": "java.net.SocketTimeoutException"})))
    c = call(d)
    assert (c["error"], c["status"], c["dst_service"], c["authority"]) == ("timeout", 0, "", "pay")
    assert c["attributes"] == (("span.name", "op"), ("error.type", "java.net.SocketTimeoutException"))


@pytest.mark.parametrize("error_type, error", [
    ("DEADLINE_EXCEEDED", "timeout"), ("ConnectionRefusedError", "refused"), ("ECONNRESET", "reset"),
    ("ssl.SSLCertVerificationError", "tls_error"), ("javax.net.ssl.SSLHandshakeException", "tls_error"),
    ("x509: certificate signed by unknown authority", "tls_error"), ("TimedOut", "timeout"),
    ("ETIMEDOUT", "timeout"), ("context deadline exceeded", "timeout"), ("ClassLoaderError", "ClassLoaderError"),
    ("500", ""), ("_OTHER", "_OTHER"), ("KeyError", "KeyError"),
])
def test_error_type_values_map_to_error_classes(error_type, error):
    d = decode_pb(request(span(attrs={"http.request.method": "GET", "error.type": error_type})))
    assert d.calls["error"] == [error]


def test_grpc_spans_old_and_stable_rpc_names_are_grpc_calls():
    old = span(kind=trace_pb2.Span.SPAN_KIND_CLIENT, attrs={
        "rpc.system": "grpc", "rpc.service": "shop.Inventory", "rpc.method": "Reserve",
        "rpc.grpc.status_code": 4, "server.address": "inventory", "server.port": 50051,
        "error.type": "DEADLINE_EXCEEDED"})
    stable = span(attrs={"rpc.system.name": "grpc", "rpc.method": "shop.Inventory/Reserve",
                         "rpc.response.status_code": "UNAVAILABLE"})
    d = decode_pb(request(old, stable, resource=RESOURCE))
    a, b = call(d, 0), call(d, 1)
    assert (a["protocol"], a["method"], a["path"], a["grpc_status"], a["error"], a["dst_service"], a["authority"]) == (
        "grpc", "/shop.Inventory/Reserve", "/shop.Inventory/Reserve", 4, "timeout", "inventory", "inventory:50051")
    assert (b["protocol"], b["method"], b["grpc_status"], b["dst_service"]) == (
        "grpc", "/shop.Inventory/Reserve", 14, "orders")


def test_other_rpc_systems_keep_the_http_default():
    d = decode_pb(request(span(attrs={"rpc.system": "connect_rpc", "rpc.service": "a.B", "rpc.method": "C"})))
    assert (d.calls["protocol"], d.calls["method"], d.calls["grpc_status"]) == (["http/1.1"], ["/a.B/C"], [-1])


def test_http_method_other_uses_the_original_method():
    d = decode_pb(request(span(attrs={"http.request.method": "_OTHER", "http.request.method_original": "PURGE"})))
    assert d.calls["method"] == ["PURGE"]


@pytest.mark.parametrize("kind, attrs", [
    (trace_pb2.Span.SPAN_KIND_INTERNAL, {"http.request.method": "GET"}),
    (trace_pb2.Span.SPAN_KIND_PRODUCER, {"http.request.method": "GET"}),
    (trace_pb2.Span.SPAN_KIND_CONSUMER, {"rpc.system": "grpc"}),
    (trace_pb2.Span.SPAN_KIND_SERVER, {"db.system": "postgresql"}),
    (trace_pb2.Span.SPAN_KIND_CLIENT, {}),
])
def test_spans_that_are_not_http_or_rpc_server_or_client_spans_make_no_call(kind, attrs):
    d = decode_pb(request(span(kind=kind, attrs=attrs)))
    assert d.accepted == 1 and d.calls == {}


def test_nonsense_numbers_in_attributes_fall_back_to_defaults():
    d = decode_pb(request(span(attrs={"http.request.method": "GET", "http.response.status_code": "999999",
                                      "client.port": -5, "http.request.body.size": "lots",
                                      "rpc.system": "grpc", "rpc.grpc.status_code": 40000})))
    c = call(d)
    assert (c["status"], c["src_port"], c["request_bytes"], c["grpc_status"]) == (0, 0, 0, -1)


# -- calls_to_spans: call records in, spans out ---------------------------------------------

def calls(*rows: dict[str, object]) -> dict[str, list[object]]:
    """Column form of call rows; a column missing from every row is left out (it takes its default)."""
    names = [n for n in CALL_COLUMN_NAMES if any(n in r for r in rows)]
    defaults = {"time": 0, "duration_ns": 0, "src_port": 0, "dst_port": 0, "status": 0, "grpc_status": -1,
                "request_bytes": 0, "response_bytes": 0, "tls": False, "attempt": 0, "attributes": {}}
    return {n: [r.get(n, defaults.get(n, "")) for r in rows] for n in names}


def spans(columns: dict[str, list[object]]) -> list[dict[str, object]]:
    out = calls_to_spans(columns)
    to_table("otel_traces", out)  # always insertable
    n = len(out["TraceId"])
    return [{k: v[i] for k, v in out.items()} for i in range(n)]


CLIENT_CALL = {
    "time": T0, "duration_ns": 2_500_000, "observer": "client", "observer_id": "sidecar-frontend-1",
    "trace_id": TRACE, "span_id": "eee19b7ec3c1b174", "parent_span_id": "eee19b7ec3c1b173",
    "src_service": "frontend", "src_instance": "frontend-6d4b:8080", "src_addr": "10.0.0.5", "src_port": 41000,
    "dst_service": "checkout", "dst_addr": "10.0.0.9", "dst_port": 8080, "protocol": "http/1.1",
    "method": "GET", "authority": "checkout:8080", "path": "/orders/7", "route": "/orders/{id}", "status": 200,
    "request_bytes": 0, "response_bytes": 512, "mode": "observe", "attributes": {"x-request-id": "r-1"},
}


def test_a_client_call_with_trace_context_becomes_a_client_span_of_the_caller():
    assert spans(calls(CLIENT_CALL)) == [{
        "Timestamp": T0, "TraceId": TRACE, "SpanId": "eee19b7ec3c1b174", "ParentSpanId": "eee19b7ec3c1b173",
        "TraceState": "", "SpanName": "GET /orders/{id}", "SpanKind": "Client", "ServiceName": "frontend",
        "ResourceAttributes": (("service.name", "frontend"), ("service.instance.id", "frontend-6d4b:8080")),
        "ScopeName": "meshlens", "ScopeVersion": "",
        "SpanAttributes": (
            ("http.request.method", "GET"), ("http.response.status_code", "200"), ("url.path", "/orders/7"),
            ("http.route", "/orders/{id}"), ("url.scheme", "http"), ("network.protocol.name", "http"),
            ("network.protocol.version", "1.1"), ("peer.service", "checkout"), ("server.address", "checkout"),
            ("server.port", "8080"), ("network.peer.address", "10.0.0.9"), ("network.peer.port", "8080"),
            ("http.response.body.size", "512"), ("meshlens.observer", "client"), ("meshlens.mode", "observe"),
            ("x-request-id", "r-1"),
        ),
        "Duration": 2_500_000, "StatusCode": "Unset", "StatusMessage": "",
    }]


def test_a_server_call_becomes_a_server_span_of_the_callee_and_5xx_is_an_error():
    row = {**CLIENT_CALL, "observer": "server", "observer_id": "sidecar-checkout-2", "status": 503,
           "route": "", "protocol": "h2", "tls": True, "attributes": [("k", "v")]}
    [s] = spans(calls(row))
    assert (s["SpanKind"], s["ServiceName"], s["SpanName"], s["StatusCode"]) == (
        "Server", "checkout", "GET", "Error")
    assert s["ResourceAttributes"] == (("service.name", "checkout"), ("service.instance.id", "sidecar-checkout-2"))
    attrs = dict(s["SpanAttributes"])
    assert attrs["client.address"] == "10.0.0.5" and attrs["client.port"] == "41000"
    assert attrs["network.peer.address"] == "10.0.0.5" and attrs["peer.service"] == "frontend"
    assert attrs["network.protocol.version"] == "2" and attrs["url.scheme"] == "https" and attrs["k"] == "v"
    assert "http.route" not in attrs


@pytest.mark.parametrize("observer, status, error, code", [
    ("client", 404, "", "Error"), ("server", 404, "", "Unset"), ("server", 500, "", "Error"),
    ("client", 0, "timeout", "Error"), ("server", 200, "reset", "Error"),
])
def test_status_code_follows_the_http_semconv_per_side(observer, status, error, code):
    [s] = spans(calls({**CLIENT_CALL, "observer": observer, "status": status, "error": error}))
    assert s["StatusCode"] == code
    assert s["StatusMessage"] == error
    assert dict(s["SpanAttributes"]).get("error.type", "") == error


def test_a_wire_call_is_not_a_span_because_its_traceparent_names_the_senders_span():
    assert spans(calls({**CLIENT_CALL, "observer": "wire", "observer_id": "tap-1"})) == []


def test_grpc_and_tcp_calls_are_named_by_method_or_protocol():
    grpc = {**CLIENT_CALL, "protocol": "grpc", "method": "/shop.Inventory/Reserve", "path": "/shop.Inventory/Reserve",
            "route": "", "grpc_status": 4, "status": 200}
    tcp = {**CLIENT_CALL, "protocol": "tcp", "method": "", "path": "", "route": "", "status": 0, "authority": "",
           "request_bytes": 10, "response_bytes": 20, "span_id": "eee19b7ec3c1b175"}
    g, t = spans(calls(grpc, tcp))
    assert (g["SpanName"], g["StatusCode"]) == ("shop.Inventory/Reserve", "Error")
    assert {k: v for k, v in g["SpanAttributes"] if k.startswith("rpc.")} == {
        "rpc.system.name": "grpc", "rpc.method": "shop.Inventory/Reserve",
        "rpc.response.status_code": "DEADLINE_EXCEEDED"}
    assert (t["SpanName"], t["StatusCode"]) == ("tcp", "Unset")
    attrs = dict(t["SpanAttributes"])
    assert attrs["network.transport"] == "tcp" and attrs["server.address"] == "10.0.0.9"
    assert attrs["meshlens.request_bytes"] == "10" and "http.request.method" not in attrs


def test_grpc_server_span_errors_only_for_server_fault_codes():
    base = {**CLIENT_CALL, "observer": "server", "protocol": "grpc", "method": "/a.B/C"}
    not_found, unavailable = spans(calls({**base, "grpc_status": 5}, {**base, "grpc_status": 14}))
    assert (not_found["StatusCode"], unavailable["StatusCode"]) == ("Unset", "Error")


def test_calls_without_trace_context_or_from_otlp_make_no_span():
    rows = [{**CLIENT_CALL, "trace_id": ""}, {**CLIENT_CALL, "span_id": ""},
            {**CLIENT_CALL, "observer": "otlp"}, {**CLIENT_CALL, "span_id": "00f067aa0ba902b7"}]
    out = spans(calls(*rows))
    assert [s["SpanId"] for s in out] == ["00f067aa0ba902b7"]
    assert calls_to_spans({}) == {name: [] for name in CALL_SPAN_COLUMNS}


def test_missing_columns_take_their_defaults():
    [s] = spans({"trace_id": [TRACE], "span_id": ["eee19b7ec3c1b174"], "observer": ["client"]})
    assert (s["ServiceName"], s["SpanName"], s["Timestamp"], s["Duration"], s["ParentSpanId"]) == (
        "", "tcp", 0, 0, "")  # no protocol recorded: a connection
    assert s["ResourceAttributes"] == (("service.name", ""),)
    assert s["SpanAttributes"] == (("network.transport", "tcp"), ("meshlens.observer", "client"))
    [h] = spans({"trace_id": [TRACE], "span_id": ["eee19b7ec3c1b174"], "observer": ["server"],
                 "protocol": ["http/1.1"]})
    assert h["SpanName"] == "HTTP" and h["SpanKind"] == "Server"


def test_ipv6_authorities_lose_their_brackets_in_server_address():
    [s] = spans(calls({**CLIENT_CALL, "authority": "[::1]:9000"}))
    attrs = dict(s["SpanAttributes"])
    assert (attrs["server.address"], attrs["server.port"]) == ("::1", "9000")


def test_a_call_written_as_a_span_maps_back_to_the_same_call():
    traces = calls_to_spans(calls(CLIENT_CALL))
    back = spans_to_calls(traces)
    to_table("calls", back)
    got = {k: v[0] for k, v in back.items()}
    for name in ("time", "duration_ns", "trace_id", "span_id", "parent_span_id", "src_service", "src_instance",
                 "dst_service", "dst_addr", "dst_port", "protocol", "method", "authority", "path", "route",
                 "status", "response_bytes", "tls", "error"):
        assert got[name] == CLIENT_CALL.get(name, got[name]), name
    assert got["observer"] == "otlp" and got["src_instance"] == "frontend-6d4b:8080"

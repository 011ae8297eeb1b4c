"""The /v1/calls batch format: columns in, the same columns out; anything else is a BatchFormatError."""
from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector.batch_format import CONTENT_TYPE, VERSION, BatchFormatError, decode, encode, omit_defaults
from meshlens.collector.columns import CALLS_SCHEMA, to_table
from meshlens.collector.record import CALL_COLUMN_NAMES, CALL_COLUMNS, Call
from meshlens.collector.spans import calls_to_spans


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_round_trip_of_calls() -> None:
    calls = [
        Call(time=1_700_000_000_000_000_000, duration_ns=1500, observer="client", dst_service="cart",
             method="GET", path="/cart/7", status=200, attributes={"k8s.pod": "cart-1", "zone": "a"}),
        Call(time=1_700_000_000_000_000_001, dst_service="pay", protocol="grpc", grpc_status=14,
             error="reset", tls=True, attempt=2),
    ]
    columns = {name: [getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES}

    wire = encode(columns)

    assert json.loads(wire)["v"] == VERSION and json.loads(wire)["n"] == 2
    decoded = decode(wire)
    assert decoded == {**columns, "attributes": [[("k8s.pod", "cart-1"), ("zone", "a")], []]}
    table = to_table("calls", decoded)
    assert table.schema == CALLS_SCHEMA
    assert table["status"].to_pylist() == [200, 0]
    assert table["grpc_status"].to_pylist() == [-1, 14]
    assert table["attributes"].to_pylist() == [[("k8s.pod", "cart-1"), ("zone", "a")], []]


def test_absent_columns_take_their_defaults() -> None:
    decoded = decode(encode({"dst_service": ["a", "b"], "status": [200, 503]}))

    assert decoded == {"dst_service": ["a", "b"], "status": [200, 503]}
    row = to_table("calls", decoded).to_pylist()[1]
    assert (row["dst_service"], row["status"], row["grpc_status"], row["path"], row["attributes"]) == \
        ("b", 503, -1, "", [])


def test_empty_batch() -> None:
    assert encode({}) == b'{"v":1,"n":0,"columns":{}}'
    assert decode(encode({})) == {}
    assert to_table("calls", decode(encode({}))).num_rows == 0


def test_gzip_bodies_are_the_servers_business() -> None:
    # decode() takes the plain body; Content-Encoding is undone by the endpoint.
    with pytest.raises(BatchFormatError, match="invalid JSON"):
        decode(gzip.compress(encode({"status": [200]})))
    assert CONTENT_TYPE == "application/x-meshlens-calls+json"


@pytest.mark.parametrize("wire, message", [
    (b"{not json", "invalid JSON: Expecting property name"),
    (b"\xff\xfe\x00garbage", "invalid JSON"),
    (b"", "invalid JSON"),
    (b"[" * 100_000, "invalid JSON"),  # nesting deeper than the parser's recursion limit
    (body([1, 2]), "batch must be a JSON object with v, n and columns"),
    (body("calls"), "batch must be a JSON object"),
    (body({"n": 0, "columns": {}}), "unsupported batch version None: this collector reads v1"),
    (body({"v": 2, "n": 0, "columns": {}}), "unsupported batch version 2: this collector reads v1"),
    (body({"v": "1", "n": 0, "columns": {}}), "unsupported batch version '1'"),
    (body({"v": True, "n": 0, "columns": {}}), "unsupported batch version True"),
    (body({"v": 1.0, "n": 0, "columns": {}}), "unsupported batch version 1.0"),
    (body({"v": 1, "columns": {}}), "'n' must be the number of rows"),
    (body({"v": 1, "n": -1, "columns": {}}), "'n' must be the number of rows"),
    (body({"v": 1, "n": "2", "columns": {}}), "'n' must be the number of rows"),
    (body({"v": 1, "n": True, "columns": {}}), "'n' must be the number of rows"),
    (body({"v": 1, "n": 1.0, "columns": {}}), "'n' must be the number of rows"),
    (body({"v": 1, "n": 0}), "'columns' must be an object of column name to list of values"),
    (body({"v": 1, "n": 0, "columns": [[]]}), "'columns' must be an object"),
    (body({"v": 1, "n": 1, "columns": {"status": [200], "latency_ms": [3]}}), r"unknown column\(s\): latency_ms"),
    (body({"v": 1, "n": 0, "columns": {"b": [], "a": [], "status": []}}), r"unknown column\(s\): a, b"),
    (body({"v": 1, "n": 2, "columns": {"status": [200]}}), "column 'status' must be a list of 2 values"),
    (body({"v": 1, "n": 1, "columns": {"status": [200], "path": ["/a", "/b"]}}),
     "column 'path' must be a list of 1 values"),
    (body({"v": 1, "n": 1, "columns": {"status": 200}}), "column 'status' must be a list of 1 values"),
    (body({"v": 1, "n": 2, "columns": {"attributes": [{"a": "1"}, {"b": 2}]}}),
     "attributes of row 1 must be an object of strings"),
    (body({"v": 1, "n": 1, "columns": {"attributes": [["a", "1"]]}}), "attributes of row 0 must be an object"),
    (body({"v": 1, "n": 1, "columns": {"attributes": [None]}}), "attributes of row 0 must be an object"),
])
def test_envelope_errors(wire: bytes, message: str) -> None:
    with pytest.raises(BatchFormatError, match=message):
        decode(wire)


def test_many_unknown_columns_are_named_up_to_five() -> None:
    with pytest.raises(BatchFormatError) as exc:
        decode(body({"v": 1, "n": 0, "columns": {f"x{i}": [] for i in range(8)}}))

    assert str(exc.value) == "unknown column(s): x0, x1, x2, x3, x4"


@pytest.mark.parametrize("columns, message", [
    ({"status": ["ok"]}, "column 'status'"),
    ({"status": [70_000]}, "column 'status'"),
    ({"time": ["yesterday"]}, "column 'time'"),
    ({"tls": [{"yes": 1}]}, "column 'tls'"),
    ({"dst_service": [7]}, "column 'dst_service'"),
])
def test_value_types_are_checked_when_the_table_is_built(columns: dict, message: str) -> None:
    decoded = decode(encode(columns))  # the envelope is fine

    with pytest.raises(ValueError, match=message):
        to_table("calls", decoded)


# -- fuzz ----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
column_names = st.sampled_from(CALL_COLUMN_NAMES) | st.text(max_size=6)


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """Envelopes that are mostly right, so the fuzz gets past the first checks."""
    n = draw(st.integers(0, 3) | json_values)
    rows = n if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 3 else draw(st.integers(0, 3))
    column = st.lists(json_values, min_size=rows, max_size=rows) | json_values
    attributes = st.lists(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_scalars, max_size=2),
                          min_size=rows, max_size=rows)
    columns = draw(st.dictionaries(column_names, column, max_size=5) | json_values)
    if isinstance(columns, dict) and draw(st.booleans()):
        columns["attributes"] = draw(attributes)
    doc = {"v": draw(st.just(VERSION) | json_scalars), "n": n, "columns": columns}
    return {k: v for k, v in doc.items() if draw(st.integers(0, 9)) > 0}  # sometimes a key is missing


def decode_and_build(wire: bytes) -> None:
    try:
        columns = decode(wire)
    except BatchFormatError:
        return
    try:
        to_table("calls", columns)
    except ValueError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(wire: bytes) -> None:
    decode_and_build(wire)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches() | json_values)
def test_fuzz_arbitrary_json_batches(doc: object) -> None:
    decode_and_build(json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(Call, time=st.integers(0, 2**62), status=st.integers(0, 999),
                          dst_service=st.text(max_size=10), tls=st.booleans(),
                          attributes=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
                max_size=5))
def test_fuzz_round_trip_of_calls(calls: list[Call]) -> None:
    columns = {f.name: [getattr(c, f.name) for c in calls] for f in dataclasses.fields(Call)} if calls else {}

    decoded = decode(encode(columns))

    table = to_table("calls", decoded)
    assert table.num_rows == len(calls)
    assert [dict(a) for a in table["attributes"].to_pylist()] == [c.attributes for c in calls]
    assert table["dst_service"].to_pylist() == [c.dst_service for c in calls]


# -- the encoder's shortcuts: what reaches the collector does not change ---------------


def columns_of(calls: list[Call]) -> dict:
    return {name: [getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES}


def test_columns_that_hold_only_their_default_are_left_out() -> None:
    columns = columns_of([Call(time=1, dst_service="a", status=200), Call(time=2, dst_service="b", status=0)])

    kept = omit_defaults(columns)

    assert list(kept) == ["time", "dst_service", "status"]
    assert kept["status"] is columns["status"]


def test_a_batch_without_its_default_columns_stores_identical_rows() -> None:
    calls = [Call(time=1, observer="server", dst_service="a", status=200, grpc_status=-1, attributes={},
                  trace_id="t" * 32, span_id="s" * 16),
             Call(time=2, observer="server", dst_service="b", method="GET", grpc_status=-1, attempt=0)]
    columns = columns_of(calls)

    full, trimmed = decode(encode(columns)), decode(encode(omit_defaults(columns)))

    assert len(trimmed) < len(full)
    assert to_table("calls", trimmed).equals(to_table("calls", full))
    assert to_table("calls", trimmed).to_pylist() == to_table("calls", full).to_pylist()
    # the collector also derives spans from the decoded columns, before the table: same spans
    assert calls_to_spans(trimmed) == calls_to_spans(full) and calls_to_spans(full)["TraceId"] == ["t" * 32]


@pytest.mark.parametrize("column, values", [
    ("attempt", [0, False]),         # == 0 but a bool: the collector's type check decides, not the encoder
    ("status", [0.0, 0]),            # == 0 but a float
    ("tls", [False, 0]),             # == False but an int
    ("grpc_status", [-1, -1.0]),
    ("attempt", [0, 1]),             # simply not all default
    ("attributes", [{}, {"k": "v"}]),
])
def test_a_column_is_left_out_only_when_every_value_is_the_default_of_its_type(column: str, values: list) -> None:
    assert omit_defaults({"time": [1, 2], column: values}) == {"time": [1, 2], column: values}


def test_an_all_default_batch_keeps_one_column_to_carry_its_rows() -> None:
    columns = columns_of([Call(), Call()])

    kept = omit_defaults(columns)

    assert kept == {"time": [0, 0]}
    assert to_table("calls", decode(encode(kept))).to_pylist() == to_table("calls", decode(encode(columns))).to_pylist()
    assert omit_defaults({}) == {}


def test_unknown_columns_are_never_left_out() -> None:
    # the collector must still refuse them by name
    assert omit_defaults({"time": [1], "latency_ms": [0]}) == {"time": [1], "latency_ms": [0]}


text_or_default = st.just("") | st.text(max_size=4)
int_or_default = st.just(0) | st.integers(0, 60_000)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(Call, time=st.integers(0, 2**62), status=int_or_default, dst_service=text_or_default,
                          path=text_or_default, observer=st.sampled_from(["client", "server", "wire"]),
                          trace_id=st.just("") | st.just("a" * 32), span_id=st.just("") | st.just("b" * 16),
                          protocol=st.sampled_from(["", "http/1.1", "grpc", "tcp"]),
                          grpc_status=st.just(-1) | st.integers(-1, 16), tls=st.booleans(),
                          attempt=st.just(0) | st.integers(0, 255),
                          attributes=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
                min_size=1, max_size=5))
def test_fuzz_omitted_defaults_store_the_same_rows(calls: list[Call]) -> None:
    columns = columns_of(calls)

    trimmed, full = decode(encode(omit_defaults(columns))), decode(encode(columns))

    assert to_table("calls", trimmed).to_pylist() == to_table("calls", full).to_pylist()
    assert to_table("calls", trimmed).num_rows == len(calls)
    assert calls_to_spans(trimmed) == calls_to_spans(full)


def test_the_defaults_left_out_are_the_collectors_defaults() -> None:
    from meshlens.collector.columns import DEFAULTS

    assert {c.name: c.default() for c in CALL_COLUMNS} == DEFAULTS["calls"]

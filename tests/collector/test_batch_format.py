"""The /v1/calls batch format: columns in, the same columns out; anything else is a BatchFormatError."""
from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.batch_format import CONTENT_TYPE, VERSION, BatchFormatError, decode, encode
from collector.columns import CALLS_SCHEMA, to_table
from collector.record import CALL_COLUMN_NAMES, Call


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

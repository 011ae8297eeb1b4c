"""The /v1/calls batch format: columns in, the same rows out; anything else is a BatchFormatError."""
from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector.batch_format import (CONTENT_TYPE, MAX_BATCH_ID_CHARS, VERSION, Batch, BatchFormatError,
                                             decode, encode, encode_slices)
from meshlens.collector.columns import CALLS_SCHEMA, to_table
from meshlens.collector.record import CALL_COLUMN_NAMES, CALL_COLUMNS, Call
from meshlens.collector.spans import calls_to_spans


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def plain(columns: dict) -> dict:
    """`columns` as the collector decodes them from a body that lists every value (no shortcut)."""
    n = len(next(iter(columns.values()))) if columns else 0
    return decode(body({"v": VERSION, "n": n, "columns": columns})).columns


def test_round_trip_of_calls() -> None:
    calls = [
        Call(time=1_700_000_000_000_000_000, duration_ns=1500, observer="client", dst_service="cart",
             method="GET", path="/cart/7", status=200, attributes={"k8s.pod": "cart-1", "zone": "a"}),
        Call(time=1_700_000_000_000_000_001, dst_service="pay", protocol="grpc", grpc_status=14,
             error="reset", tls=True, attempt=2),
    ]
    columns = {name: [getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES}

    wire = encode(columns, "3f2a9c1be07d4411-7")

    assert json.loads(wire)["v"] == VERSION and json.loads(wire)["n"] == 2
    batch = decode(wire)
    assert (batch.id, batch.n) == ("3f2a9c1be07d4411-7", 2)
    assert batch.columns["attributes"] == [[("k8s.pod", "cart-1"), ("zone", "a")], []]
    table = to_table("calls", batch.columns)
    assert table.schema == CALLS_SCHEMA
    assert table.to_pylist() == to_table("calls", plain(columns)).to_pylist()
    assert table["status"].to_pylist() == [200, 0]
    assert table["grpc_status"].to_pylist() == [-1, 14]
    assert table["attributes"].to_pylist() == [[("k8s.pod", "cart-1"), ("zone", "a")], []]


def test_absent_columns_take_their_defaults() -> None:
    decoded = decode(encode({"dst_service": ["a", "b"], "status": [200, 503]})).columns

    assert decoded == {"dst_service": ["a", "b"], "status": [200, 503]}
    row = to_table("calls", decoded).to_pylist()[1]
    assert (row["dst_service"], row["status"], row["grpc_status"], row["path"], row["attributes"]) == \
        ("b", 503, -1, "", [])


def test_empty_batch() -> None:
    assert encode({}) == b'{"v":1,"n":0,"columns":{}}'
    assert decode(encode({})) == Batch(None, 0, {})
    assert to_table("calls", decode(encode({})).columns).num_rows == 0


def test_the_batch_id_travels_and_is_optional() -> None:
    assert encode({"status": [200]}, "a1.b_2:c-3") == b'{"v":1,"id":"a1.b_2:c-3","n":1,"columns":{"status":[200]}}'
    assert decode(encode({"status": [200]}, "a1.b_2:c-3")).id == "a1.b_2:c-3"
    assert decode(encode({"status": [200]})).id is None  # an older producer's body
    assert decode(encode({}, "x" * MAX_BATCH_ID_CHARS)).id == "x" * MAX_BATCH_ID_CHARS


@pytest.mark.parametrize("batch_id", ["", "x" * (MAX_BATCH_ID_CHARS + 1), "a b", "é", "a\nb"])
def test_encode_refuses_a_batch_id_the_collector_would(batch_id: str) -> None:
    with pytest.raises(BatchFormatError, match="'id'"):
        encode({"status": [200]}, batch_id)


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
    (body({"v": 1, "n": 2, "columns": {"status": {"all": 200, "x": 1}}}),
     "column 'status' must be a list of 2 values or {\"all\": value}"),
    (body({"v": 1, "n": 2, "columns": {"status": {"any": 200}}}), "column 'status' must be a list of 2 values"),
    (body({"v": 1, "n": 2, "columns": {"bogus": {"all": 200}}}), r"unknown column\(s\): bogus"),
    (body({"v": 1, "n": 2, "columns": {"attributes": {"all": ["a"]}}}),
     "attributes of every row must be an object of strings"),
    (body({"v": 1, "id": 7, "n": 0, "columns": {}}), "'id' must be a string \\(the producer's batch id\\), not int"),
    (body({"v": 1, "id": None, "n": 0, "columns": {}}), "'id' must be a string .*not NoneType"),
    (body({"v": 1, "id": ["a"], "n": 0, "columns": {}}), "'id' must be a string .*not list"),
    (body({"v": 1, "id": True, "n": 0, "columns": {}}), "'id' must be a string .*not bool"),
    (body({"v": 1, "id": "", "n": 0, "columns": {}}), f"'id' must be 1 to {MAX_BATCH_ID_CHARS} characters, not 0"),
    (body({"v": 1, "id": "x" * 1000, "n": 0, "columns": {}}),
     f"'id' must be 1 to {MAX_BATCH_ID_CHARS} characters, not 1000"),
    (body({"v": 1, "id": "a/b", "n": 0, "columns": {}}), "'id' may hold only A-Z a-z 0-9 . _ : -"),
    (body({"v": 1, "id": "a\nb", "n": 0, "columns": {}}), "'id' may hold only"),
    (body({"v": 1, "n": 2, "columns": {"attributes": [{"a": "1"}, {"b": 2}]}}),
     "attributes of row 1 must be an object of strings"),
    (body({"v": 1, "n": 1, "columns": {"attributes": [["a", "1"]]}}), "attributes of row 0 must be an object"),
    (body({"v": 1, "n": 1, "columns": {"attributes": [None]}}), "attributes of row 0 must be an object"),
])
def test_envelope_errors(wire: bytes, message: str) -> None:
    with pytest.raises(BatchFormatError, match=message) as exc:
        decode(wire)

    assert "\n" not in str(exc.value)  # answered as one line


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
    decoded = decode(encode(columns)).columns  # the envelope is fine

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
# ids that are nearly right: the right characters, lengths around the limit, a stray character
batch_ids = (st.text("ab09._:-", min_size=0, max_size=MAX_BATCH_ID_CHARS + 2)
             | st.text(max_size=MAX_BATCH_ID_CHARS + 2) | st.integers() | st.none())


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
    if isinstance(columns, dict) and columns and draw(st.booleans()):
        columns[next(iter(columns))] = {"all": draw(json_values)}  # sometimes one value for every row
    doc = {"v": draw(st.just(VERSION) | json_scalars), "n": n, "columns": columns,
           "id": draw(batch_ids | json_values)}
    return {k: v for k, v in doc.items() if draw(st.integers(0, 9)) > 0}  # sometimes a key is missing


def decode_and_build(wire: bytes) -> None:
    try:
        batch = decode(wire)
    except BatchFormatError as e:
        assert str(e) and "\n" not in str(e)  # the 400's one line
        return
    assert batch.id is None or (1 <= len(batch.id) <= MAX_BATCH_ID_CHARS and batch.id.isascii())
    assert all(len(v) == batch.n for v in batch.columns.values())
    try:
        to_table("calls", batch.columns)
    except ValueError:
        pass


@settings(max_examples=500, deadline=None)
@given(batch_ids)
def test_fuzz_batch_ids_are_kept_exactly_or_refused_in_one_line(batch_id: object) -> None:
    wire = body({"v": VERSION, "id": batch_id, "n": 1, "columns": {"status": [200]}})
    try:
        got = decode(wire).id
    except BatchFormatError as e:
        assert str(e).startswith("'id' ") and "\n" not in str(e)
        return
    assert got == batch_id and isinstance(got, str) and 1 <= len(got) <= MAX_BATCH_ID_CHARS
    assert all(c.isalnum() or c in "._:-" for c in got) and got.isascii()


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

    decoded = decode(encode(columns)).columns

    table = to_table("calls", decoded)
    assert table.num_rows == len(calls)
    assert [dict(a) for a in table["attributes"].to_pylist()] == [c.attributes for c in calls]
    assert table["dst_service"].to_pylist() == [c.dst_service for c in calls]


# -- the encoder's shortcuts: what reaches the collector does not change ---------------


def columns_of(calls: list[Call]) -> dict:
    return {name: [getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES}


def sent(columns: dict, batch_id: str | None = None) -> dict:
    """The columns of the body `encode` writes, as on the wire."""
    return json.loads(encode(columns, batch_id))["columns"]


def test_columns_that_hold_only_their_default_are_left_out_and_one_value_is_sent_once() -> None:
    columns = columns_of([Call(time=1, dst_service="a", observer="server", status=200),
                          Call(time=2, dst_service="b", observer="server", status=0)])

    assert sent(columns) == {"time": [1, 2], "observer": {"all": "server"}, "dst_service": ["a", "b"],
                             "status": [200, 0]}


def test_a_batch_with_the_shortcuts_stores_identical_rows() -> None:
    calls = [Call(time=1, observer="server", dst_service="a", status=200, grpc_status=-1, attributes={},
                  trace_id="t" * 32, span_id="s" * 16),
             Call(time=2, observer="server", dst_service="b", method="GET", grpc_status=-1, attempt=0,
                  trace_id="t" * 32, span_id="u" * 16)]
    columns = columns_of(calls)

    full, trimmed = plain(columns), decode(encode(columns)).columns

    assert len(encode(columns)) < len(body({"v": 1, "n": 2, "columns": columns})) / 2
    assert to_table("calls", trimmed).equals(to_table("calls", full))
    assert to_table("calls", trimmed).to_pylist() == to_table("calls", full).to_pylist()
    # the collector also derives spans from the decoded columns, before the table: same spans
    assert calls_to_spans(trimmed) == calls_to_spans(full) and calls_to_spans(full)["TraceId"] == ["t" * 32] * 2


@pytest.mark.parametrize("column, values", [
    ("attempt", [0, False]),         # == 0 but a bool: the collector's type check decides, not the encoder
    ("status", [0.0, 0]),            # == 0 but a float
    ("tls", [False, 0]),             # == False but an int
    ("grpc_status", [-1, -1.0]),
    ("status", [200, 200.0]),        # one value, two types: not sent once either
    ("tls", [True, 1]),
    ("attempt", [0, 1]),             # simply not one value
    ("attributes", [{}, {"k": "v"}]),
])
def test_a_column_is_left_out_or_sent_once_only_when_every_value_is_one_value_of_one_type(column: str,
                                                                                        values: list) -> None:
    assert sent({"time": [1, 2], column: values}) == {"time": [1, 2], column: values}


def test_one_value_of_a_type_other_than_the_defaults_is_sent_once_not_left_out() -> None:
    assert sent({"time": [1, 2], "attempt": [False, False], "tls": [0, 0]}) == \
        {"time": [1, 2], "attempt": {"all": False}, "tls": {"all": 0}}  # for the collector to refuse


def test_one_row_is_sent_as_lists() -> None:
    assert sent({"time": [5], "observer": ["client"], "status": [0]}) == {"time": [5], "observer": ["client"]}


def test_an_all_default_batch_keeps_one_column_to_carry_its_rows() -> None:
    columns = columns_of([Call(), Call()])

    kept = sent(columns)

    assert kept == {"time": {"all": 0}}
    assert to_table("calls", decode(encode(columns)).columns).to_pylist() == \
        to_table("calls", plain(columns)).to_pylist()
    assert sent({}) == {}


def test_unknown_columns_are_never_left_out() -> None:
    # the collector must still refuse them by name
    assert sent({"time": [1, 2], "latency_ms": [0, 0]}) == {"time": [1, 2], "latency_ms": {"all": 0}}
    with pytest.raises(BatchFormatError, match="latency_ms"):
        decode(encode({"time": [1, 2], "latency_ms": [0, 0]}))


def test_slices_make_the_same_body_as_whole_columns_and_pause_after_each() -> None:
    # path varies from the first slice on, status from the third: its rows before are written out
    calls = [Call(time=i, observer="client", dst_service="a", path=f"/{i % 3}", status=200 if i < 6 else 503)
             for i in range(7)]
    rows = [c.as_row() for c in calls]
    pauses = []

    pieces = encode_slices(CALL_COLUMN_NAMES, (list(zip(*rows[i:i + 3])) for i in range(0, 7, 3)), "p-1",
                           lambda: pauses.append(1))

    assert b"".join(pieces) == encode(columns_of(calls), "p-1")
    assert json.loads(b"".join(pieces))["columns"]["status"] == [200] * 6 + [503]
    assert len(pauses) == 3


text_or_default = st.just("") | st.text(max_size=4)
int_or_default = st.just(0) | st.integers(0, 60_000)
some_calls = st.lists(st.builds(
    Call, time=st.integers(0, 2**62), status=int_or_default, dst_service=text_or_default,
    path=text_or_default, observer=st.sampled_from(["client", "server", "wire"]),
    trace_id=st.just("") | st.just("a" * 32), span_id=st.just("") | st.just("b" * 16),
    protocol=st.sampled_from(["", "http/1.1", "grpc", "tcp"]),
    grpc_status=st.just(-1) | st.integers(-1, 16), tls=st.booleans(),
    attempt=st.just(0) | st.integers(0, 255),
    attributes=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(some_calls)
def test_fuzz_the_shortcuts_store_the_same_rows(calls: list[Call]) -> None:
    columns = columns_of(calls)

    trimmed, full = decode(encode(columns)).columns, plain(columns)

    assert to_table("calls", trimmed).to_pylist() == to_table("calls", full).to_pylist()
    assert to_table("calls", trimmed).num_rows == len(calls)
    assert calls_to_spans(trimmed) == calls_to_spans(full)


@settings(max_examples=200, deadline=None)
@given(some_calls, st.integers(1, 4))
def test_fuzz_any_slicing_makes_the_same_body(calls: list[Call], size: int) -> None:
    rows = [c.as_row() for c in calls]
    slices = [list(zip(*rows[i:i + size])) for i in range(0, len(rows), size)]

    assert b"".join(encode_slices(CALL_COLUMN_NAMES, slices)) == encode(columns_of(calls))


def test_the_defaults_left_out_are_the_collectors_defaults() -> None:
    from meshlens.collector.columns import DEFAULTS

    assert {c.name: c.default() for c in CALL_COLUMNS} == DEFAULTS["calls"]

"""Arrow schemas of the tables the collector writes, derived from their definitions.

`calls` comes from collector.record.CALL_COLUMNS; `otel_traces` lists the
exporter's insert columns (collector/schema.py holds its DDL).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from meshlens.collector.record import CALL_COLUMNS

STR_MAP = pa.map_(pa.string(), pa.string())

KIND_ARROW: dict[str, pa.DataType] = {
    "time": pa.timestamp("ns"), "u64": pa.uint64(), "u16": pa.uint16(), "i16": pa.int16(),
    "u8": pa.uint8(), "bool": pa.bool_(), "str": pa.string(), "lcstr": pa.string(), "map": STR_MAP,
}

CALLS_SCHEMA = pa.schema([pa.field(c.name, KIND_ARROW[c.kind], nullable=False) for c in CALL_COLUMNS])

TRACES_SCHEMA = pa.schema([
    ("Timestamp", pa.timestamp("ns")),
    ("TraceId", pa.string()),
    ("SpanId", pa.string()),
    ("ParentSpanId", pa.string()),
    ("TraceState", pa.string()),
    ("SpanName", pa.string()),
    ("SpanKind", pa.string()),
    ("ServiceName", pa.string()),
    ("ResourceAttributes", STR_MAP),
    ("ScopeName", pa.string()),
    ("ScopeVersion", pa.string()),
    ("SpanAttributes", STR_MAP),
    ("Duration", pa.uint64()),
    ("StatusCode", pa.string()),
    ("StatusMessage", pa.string()),
    ("Events.Timestamp", pa.list_(pa.timestamp("ns"))),
    ("Events.Name", pa.list_(pa.string())),
    ("Events.Attributes", pa.list_(STR_MAP)),
    ("Links.TraceId", pa.list_(pa.string())),
    ("Links.SpanId", pa.list_(pa.string())),
    ("Links.TraceState", pa.list_(pa.string())),
    ("Links.Attributes", pa.list_(STR_MAP)),
])
TRACES_COLUMNS: tuple[str, ...] = tuple(TRACES_SCHEMA.names)

SCHEMAS: dict[str, pa.Schema] = {"calls": CALLS_SCHEMA, "otel_traces": TRACES_SCHEMA}


def _type_default(t: pa.DataType) -> Any:
    if pa.types.is_map(t) or pa.types.is_list(t):
        return []
    if pa.types.is_string(t):
        return ""
    return False if pa.types.is_boolean(t) else 0


# What an absent column holds: the record's own defaults for calls (grpc_status is
# -1, "not gRPC"), the zero value of the type for otel_traces.
DEFAULTS: dict[str, dict[str, Any]] = {
    "calls": {c.name: c.default() for c in CALL_COLUMNS},
    "otel_traces": {f.name: _type_default(f.type) for f in TRACES_SCHEMA},
}


def to_table(table: str, columns: dict[str, list[Any]]) -> pa.Table:
    """Column lists to an Arrow table of `table`'s schema; absent columns take their defaults.

    Raises ValueError (with the column's name) when a value has the wrong type.
    """
    schema, defaults = SCHEMAS[table], DEFAULTS[table]
    n = max((len(v) for v in columns.values()), default=0)
    arrays = []
    for f in schema:
        values = columns.get(f.name)
        if values is None:
            arrays.append(pa.repeat(pa.scalar(defaults[f.name], f.type), n) if n else pa.array([], f.type))
            continue
        if len(values) != n:
            raise ValueError(f"column {f.name!r} has {len(values)} values, expected {n}")
        try:
            arrays.append(pa.array(values, f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"column {f.name!r}: {e}") from None
    return pa.Table.from_arrays(arrays, schema=schema)

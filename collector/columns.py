"""The columns of the tables the collector writes, and their Arrow schemas.

`calls` comes from collector.record.CALL_COLUMNS, `mesh_changes` from
collector.changes.CHANGE_COLUMNS. `otel_traces` is listed here, once:
OTEL_TRACES, the OpenTelemetry Collector ClickHouse exporter's columns.
The DDL that created both tables is collector/schema.py's migrations, frozen as
written; tests/collector/test_migrations.py checks that a database they build
has exactly these columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from meshlens.collector.changes import CHANGE_COLUMNS
from meshlens.collector.record import CALL_COLUMNS

STR_MAP = pa.map_(pa.string(), pa.string())

KIND_ARROW: dict[str, pa.DataType] = {
    "time": pa.timestamp("ns"), "u64": pa.uint64(), "u16": pa.uint16(), "i16": pa.int16(),
    "u8": pa.uint8(), "bool": pa.bool_(), "str": pa.string(), "lcstr": pa.string(), "map": STR_MAP,
}

CALLS_SCHEMA = pa.schema([pa.field(c.name, KIND_ARROW[c.kind], nullable=False) for c in CALL_COLUMNS])
CHANGES_SCHEMA = pa.schema([pa.field(c.name, KIND_ARROW[c.kind], nullable=False) for c in CHANGE_COLUMNS])


@dataclass(frozen=True, slots=True)
class TraceColumn:
    """One column of `otel_traces`: its ClickHouse type and codec as system.columns shows them
    (a field of Events or Links, which are Nested, is an Array column there), and its Arrow type."""

    name: str
    sql_type: str
    codec: str
    arrow: pa.DataType


_DELTA, _T64, _ZSTD = "CODEC(Delta(8), ZSTD(1))", "CODEC(T64, ZSTD(1))", "CODEC(ZSTD(1))"
_TIME, _STR, _LCSTR, _MAP = "DateTime64(9)", "String", "LowCardinality(String)", "Map(LowCardinality(String), String)"
_ARROW_TIME = pa.timestamp("ns")

OTEL_TRACES: tuple[TraceColumn, ...] = (
    TraceColumn("Timestamp", _TIME, _DELTA, _ARROW_TIME),
    TraceColumn("TraceId", _STR, _ZSTD, pa.string()),
    TraceColumn("SpanId", _STR, _ZSTD, pa.string()),
    TraceColumn("ParentSpanId", _STR, _ZSTD, pa.string()),
    TraceColumn("TraceState", _STR, _ZSTD, pa.string()),
    TraceColumn("SpanName", _LCSTR, _ZSTD, pa.string()),
    TraceColumn("SpanKind", _LCSTR, _ZSTD, pa.string()),
    TraceColumn("ServiceName", _LCSTR, _ZSTD, pa.string()),
    TraceColumn("ResourceAttributes", _MAP, _ZSTD, STR_MAP),
    TraceColumn("ScopeName", _STR, _ZSTD, pa.string()),
    TraceColumn("ScopeVersion", _STR, _ZSTD, pa.string()),
    TraceColumn("SpanAttributes", _MAP, _ZSTD, STR_MAP),
    TraceColumn("Duration", "UInt64", _T64, pa.uint64()),
    TraceColumn("StatusCode", _LCSTR, _ZSTD, pa.string()),
    TraceColumn("StatusMessage", _STR, _ZSTD, pa.string()),
    TraceColumn("Events.Timestamp", f"Array({_TIME})", _ZSTD, pa.list_(_ARROW_TIME)),
    TraceColumn("Events.Name", f"Array({_LCSTR})", _ZSTD, pa.list_(pa.string())),
    TraceColumn("Events.Attributes", f"Array({_MAP})", _ZSTD, pa.list_(STR_MAP)),
    TraceColumn("Links.TraceId", f"Array({_STR})", _ZSTD, pa.list_(pa.string())),
    TraceColumn("Links.SpanId", f"Array({_STR})", _ZSTD, pa.list_(pa.string())),
    TraceColumn("Links.TraceState", f"Array({_STR})", _ZSTD, pa.list_(pa.string())),
    TraceColumn("Links.Attributes", f"Array({_MAP})", _ZSTD, pa.list_(STR_MAP)),
)
TRACES_SCHEMA = pa.schema([pa.field(c.name, c.arrow) for c in OTEL_TRACES])
TRACES_COLUMNS: tuple[str, ...] = tuple(TRACES_SCHEMA.names)

SCHEMAS: dict[str, pa.Schema] = {"calls": CALLS_SCHEMA, "otel_traces": TRACES_SCHEMA,
                                 "mesh_changes": CHANGES_SCHEMA}


def _type_default(t: pa.DataType) -> Any:
    if pa.types.is_map(t) or pa.types.is_list(t):
        return []
    if pa.types.is_string(t):
        return ""
    return False if pa.types.is_boolean(t) else 0


# What an absent column holds: the record's own defaults for calls (grpc_status is
# -1, "not gRPC") and mesh_changes, the zero value of the type for otel_traces.
DEFAULTS: dict[str, dict[str, Any]] = {
    "calls": {c.name: c.default() for c in CALL_COLUMNS},
    "otel_traces": {f.name: _type_default(f.type) for f in TRACES_SCHEMA},
    "mesh_changes": {c.name: c.default() for c in CHANGE_COLUMNS},
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

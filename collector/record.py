"""The call record: one request/response exchange (or one connection) seen by one observer.

This module is the single definition of a call. The collector's batch format
(collector/batch_format.py), the Arrow/pandas types (collector/columns.py) and
the rows producers build (`AT`, `DEFAULT_ROW`: the proxy, collector/spans.py)
are all derived from `CALL_COLUMNS`, never re-listed. The `calls` table is
what the migrations in collector/schema.py built, frozen as written: a new
field here needs a new migration, and tests/collector/test_migrations.py fails
until it has one.

It imports nothing but the standard library: the proxy's hot path and the tap
use it without pulling in pyarrow.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

Observer = Literal["client", "server", "wire", "otlp"]
OBSERVERS: tuple[str, ...] = ("client", "server", "wire", "otlp")
PROTOCOLS: tuple[str, ...] = ("http/1.1", "h2", "grpc", "tcp", "tls")
MODES: tuple[str, ...] = ("observe", "dry-run", "enforce")

# A column kind fixes the ClickHouse type, its codec, the Arrow type and the
# default. Codecs follow the OpenTelemetry ClickHouse exporter: Delta for
# timestamps, T64 for integers, ZSTD(1) everywhere.
Kind = Literal["time", "u64", "u16", "i16", "u8", "bool", "str", "lcstr", "map"]

KIND_SQL: dict[str, tuple[str, str]] = {
    "time": ("DateTime64(9)", "CODEC(Delta(8), ZSTD(1))"),
    "u64": ("UInt64", "CODEC(T64, ZSTD(1))"),
    "u16": ("UInt16", "CODEC(T64, ZSTD(1))"),
    "i16": ("Int16", "CODEC(T64, ZSTD(1))"),
    "u8": ("UInt8", "CODEC(T64, ZSTD(1))"),
    "bool": ("Bool", "CODEC(ZSTD(1))"),
    "str": ("String", "CODEC(ZSTD(1))"),
    "lcstr": ("LowCardinality(String)", "CODEC(ZSTD(1))"),
    "map": ("Map(LowCardinality(String), String)", "CODEC(ZSTD(1))"),
}

KIND_DEFAULT: dict[str, Any] = {
    "time": 0, "u64": 0, "u16": 0, "i16": -1, "u8": 0, "bool": False,
    "str": "", "lcstr": "", "map": None,
}


def _col(kind: Kind, doc: str) -> Any:
    default = KIND_DEFAULT[kind]
    if kind == "map":
        return field(default_factory=dict, metadata={"kind": kind, "doc": doc})
    return field(default=default, metadata={"kind": kind, "doc": doc})


@dataclass(slots=True)
class Call:
    """One call between two services as one observer saw it.

    Rows are never merged at write time: the same exchange seen by the client
    sidecar, the server sidecar and the tap is three rows, told apart by
    `observer`. Analysis picks one observer per question.
    """

    time: int = _col("time", "Start of the call: first request byte, ns since the Unix epoch (UTC).")
    duration_ns: int = _col("u64", "First request byte to last response byte (connection lifetime for tcp/tls), ns.")
    observer: str = _col("lcstr", "Who recorded it: client (caller's sidecar), server (callee's sidecar), wire (tap), otlp (a span).")
    observer_id: str = _col("lcstr", "Which instance of that observer: sidecar or tap id, or the span's service instance.")
    trace_id: str = _col("str", "W3C trace id, 32 lowercase hex digits, or '' when the call carried no trace context.")
    span_id: str = _col("str", "The span id of this exchange, 16 hex digits, or ''.")
    parent_span_id: str = _col("str", "The span id of the caller's span, 16 hex digits, or ''.")
    src_service: str = _col("lcstr", "Calling service name, or '' when unknown (see src_addr).")
    src_instance: str = _col("lcstr", "Calling instance (pod or host:port).")
    src_addr: str = _col("str", "Calling IP address as text.")
    src_port: int = _col("u16", "Calling TCP port.")
    dst_service: str = _col("lcstr", "Called service name, or 'ip:port' when it matches no mesh service.")
    dst_subset: str = _col("lcstr", "Subset (e.g. version) of the called instance, from the mesh definition.")
    dst_addr: str = _col("str", "Called IP address as text.")
    dst_port: int = _col("u16", "Called TCP port.")
    protocol: str = _col("lcstr", "http/1.1, h2, grpc, tcp or tls.")
    method: str = _col("lcstr", "HTTP method (or gRPC method path for grpc), '' for tcp/tls.")
    authority: str = _col("lcstr", "Host header / :authority / TLS SNI.")
    path: str = _col("str", "Request path without the query string.")
    route: str = _col("lcstr", "Templated path (/users/{id}); filled by analysis or by an instrumented app.")
    status: int = _col("u16", "HTTP status code, 0 when there was no response.")
    grpc_status: int = _col("i16", "gRPC status code, -1 when not gRPC.")
    request_bytes: int = _col("u64", "Request body bytes (bytes sent by the caller for tcp/tls).")
    response_bytes: int = _col("u64", "Response body bytes (bytes sent by the callee for tcp/tls).")
    error: str = _col("lcstr", "'' or the failure class: timeout, reset, refused, tls_error, protocol_error, incomplete, ...")
    response_flags: str = _col("lcstr", "Envoy-style response flags (UF, UH, UC, UPE, DC, DPE, ...: what Envoy's access log "
                                        "%RESPONSE_FLAGS% means by each), comma-separated, '' when none.")
    tls: bool = _col("bool", "Whether the call was carried over TLS.")
    peer_identity: str = _col("str", "Verified peer identity (SPIFFE id) when mTLS verified one, else ''.")
    mode: str = _col("lcstr", "Mode in force for the service: observe, dry-run or enforce.")
    action: str = _col("lcstr", "Policy action taken (retried, timed_out, circuit_open, ...) or that would have been (would_...).")
    attempt: int = _col("u8", "Retry attempt number, 0 for the first try.")
    attributes: dict[str, str] = _col("map", "Everything else, as strings.")

    def as_row(self) -> tuple[Any, ...]:
        """Values in CALL_COLUMNS order."""
        return tuple(getattr(self, c.name) for c in CALL_COLUMNS)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of `calls`: name, kind and what it means."""

    name: str
    kind: str
    doc: str

    @property
    def sql_type(self) -> str:
        return KIND_SQL[self.kind][0]

    @property
    def codec(self) -> str:
        return KIND_SQL[self.kind][1]

    def default(self) -> Any:
        return {} if self.kind == "map" else KIND_DEFAULT[self.kind]


CALL_COLUMNS: tuple[Column, ...] = tuple(
    Column(f.name, f.metadata["kind"], f.metadata["doc"]) for f in fields(Call)
)
CALL_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in CALL_COLUMNS)


DEFAULT_ROW: tuple[Any, ...] = tuple(c.default() for c in CALL_COLUMNS)
"""Each column's default, in CALL_COLUMNS order. Its one `{}` is shared: a producer sets its own map."""


class RowPositions:
    """Where each column sits in a row: `AT.dst_port` is the index of dst_port in `Call.as_row()`.

    For producers on a hot path (the proxy, spans_to_calls), which fill a copy of
    DEFAULT_ROW by name instead of writing every value out in order by hand.
    Measured on the proxy's record (25 columns set, CPython 3.11, CPU time, best of
    30): the tuple written out 1.10 µs, a copy of DEFAULT_ROW filled by position
    1.42 µs, a generated keyword-only `row(time=..., ...)` 3.2 µs, `Call(**kw)` 4.6 µs.
    Keyword calls are what cost, so a builder taking keywords was not kept.
    """

    __slots__ = CALL_COLUMN_NAMES

    def __init__(self) -> None:
        for i, name in enumerate(CALL_COLUMN_NAMES):
            setattr(self, name, i)


AT = RowPositions()

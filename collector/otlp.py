"""Decode OTLP trace exports (OTLP/HTTP protobuf or JSON, OTLP/gRPC messages) into table columns.

Rows are what the OpenTelemetry Collector's ClickHouse exporter writes into
`otel_traces`: hex ids, span kind and status as words, attributes as string maps
rendered like pdata's `Value.AsString`. HTTP/RPC server and client spans are also
mapped to `calls` rows (collector/spans.py). Spans with unusable ids are rejected
one by one and counted, as the collector's partial_success does; a body that does
not parse raises OTLPDecodeError, which the HTTP layer answers with 400.

The per-span loop is the collector's hot path (target: 150k spans/s in one
process). Protobuf is parsed with LazyRequest, which leaves attributes and other
nested messages as bytes so that each distinct attribute encoding is decoded once
per request; the loop builds one tuple per span, transposed into columns at the end.
OTLP/JSON goes through json_format (ids rewritten from hex first): correct, but
about 25x slower a span than protobuf.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meshlens.collector.columns import TRACES_COLUMNS
from meshlens.collector.spans import spans_to_calls

# Arrow timestamp[ns] and ClickHouse DateTime64(9) end at 2**63-1 ns (April 2262):
# a span starting later cannot be stored, so it is rejected rather than wrapped.
MAX_TIME_NS = 2**63 - 1
# Longest decoder message passed on to the client: one readable line.
MAX_ERROR_CHARS = 300

SPAN_KINDS: dict[int, str] = dict(enumerate(("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")))
STATUS_CODES: dict[int, str] = dict(enumerate(("Unset", "Ok", "Error")))

# Column order of the per-span tuples built by _decode: every otel_traces column, as listed.
ROW_COLUMNS: tuple[str, ...] = TRACES_COLUMNS

# Spans without events or links share this empty sequence: one object fewer per column
# and span for the cyclic GC to track (measured: GC was a quarter of decode time).
_NONE: tuple[()] = ()
_ZERO16 = bytes(16)
_ZERO8 = bytes(8)
# OTLP/JSON id fields (hex on the wire, base64 for json_format) by message, under both key spellings.
_SPAN_IDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")
_LINK_IDS = ("traceId", "trace_id", "spanId", "span_id")
_NESTING = re.compile(r"Failed to parse (\w+) field: ")


def _lazy_request_class() -> Any:
    """ExportTraceServiceRequest as upb sees it with nested messages left as bytes.

    Same field numbers and wire types as opentelemetry-proto's trace.proto, but
    Resource, InstrumentationScope, attributes (KeyValue), events, links and
    Status are `bytes`: upb then copies them instead of building a Python object
    per attribute, and the decoder parses each distinct encoding once (a span's
    ten attributes cost ~1 us instead of ~4 us). Every nested message is still
    parsed by the real classes before its values are used, so malformed input
    still fails. Fields meshlens does not store (flags, dropped counts,
    schema_url) are left out and skipped as unknown fields.
    """
    F = descriptor_pb2.FieldDescriptorProto
    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(name="meshlens/lazy_trace.proto", package="meshlens.lazy",
                                              syntax="proto3")
    layout = {
        "Request": [(1, "resource_spans", F.TYPE_MESSAGE, many, "ResourceSpans")],
        "ResourceSpans": [(1, "resource", F.TYPE_BYTES, one, ""),
                          (2, "scope_spans", F.TYPE_MESSAGE, many, "ScopeSpans")],
        "ScopeSpans": [(1, "scope", F.TYPE_BYTES, one, ""), (2, "spans", F.TYPE_MESSAGE, many, "Span")],
        "Span": [(1, "trace_id", F.TYPE_BYTES, one, ""), (2, "span_id", F.TYPE_BYTES, one, ""),
                 (3, "trace_state", F.TYPE_STRING, one, ""), (4, "parent_span_id", F.TYPE_BYTES, one, ""),
                 (5, "name", F.TYPE_STRING, one, ""), (6, "kind", F.TYPE_INT32, one, ""),
                 (7, "start_time_unix_nano", F.TYPE_FIXED64, one, ""),
                 (8, "end_time_unix_nano", F.TYPE_FIXED64, one, ""),
                 (9, "attributes", F.TYPE_BYTES, many, ""), (11, "events", F.TYPE_BYTES, many, ""),
                 (13, "links", F.TYPE_BYTES, many, ""), (15, "status", F.TYPE_BYTES, one, "")],
    }
    for name, fields in layout.items():
        message = file.message_type.add(name=name)
        for number, field_name, kind, label, type_name in fields:
            f = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".meshlens.lazy.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("meshlens.lazy.Request"))


LazyRequest = _lazy_request_class()


class OTLPDecodeError(ValueError):
    """The body is not a readable OTLP trace export; the message says why, in one line."""


@dataclass(slots=True)
class Decoded:
    """Columns for `otel_traces` and `calls` from one export, and what was refused.

    Values are what collector.columns.to_table takes. Maps are tuples of
    (key, value) pairs (immutable, so the GC stops tracking them and one
    resource's map is shared by its spans); Events.* and Links.* hold a list per
    span, or one shared empty tuple for a span without any. Treat it all as read-only.
    """

    traces: dict[str, list[Any]] = field(default_factory=dict)
    calls: dict[str, list[Any]] = field(default_factory=dict)
    accepted: int = 0
    rejected: int = 0
    error: str = ""


def decode_traces(body: bytes, content_type: Literal["protobuf", "json"]) -> Decoded:
    """Decode an OTLP/HTTP trace export body; raises OTLPDecodeError when it does not parse."""
    if content_type == "protobuf":
        try:
            msg = LazyRequest.FromString(body)
        except DecodeError as e:
            raise OTLPDecodeError(_one_line(f"invalid OTLP protobuf: {e}")) from None
        return _decode(msg)
    if content_type == "json":
        return decode_request(_parse_json(body))
    raise ValueError(f"content_type must be 'protobuf' or 'json', not {content_type!r}")


def decode_request(msg: ExportTraceServiceRequest) -> Decoded:
    """Columns from a parsed export request (what OTLP/gRPC hands us).

    It is re-read through LazyRequest: serializing and reparsing (~1.2 us a span)
    costs less than walking every attribute of the full message (~4.4 us).
    """
    return _decode(LazyRequest.FromString(msg.SerializeToString()))


def _decode(msg: Any) -> Decoded:
    """The per-span loop over a LazyRequest."""
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    rejected: dict[str, int] = {}
    attrs = _AttributeCache().__getitem__
    statuses = _StatusCache().__getitem__
    kind_name = SPAN_KINDS.get
    zero8, zero16 = _ZERO8, _ZERO16
    try:
        for rs in msg.resource_spans:
            resource = _attributes(Resource.FromString(rs.resource).attributes)
            service = next((v for k, v in resource if k == "service.name"), "")
            for ss in rs.scope_spans:
                scope = InstrumentationScope.FromString(ss.scope)
                scope_name, scope_version = scope.name, scope.version
                for sp in ss.spans:
                    tid, sid, pid = sp.trace_id, sp.span_id, sp.parent_span_id
                    start = sp.start_time_unix_nano
                    if (len(tid) != 16 or len(sid) != 8 or tid == zero16 or sid == zero8
                            or (pid and len(pid) != 8) or start > MAX_TIME_NS):
                        reason = _invalid(tid, sid, pid, start)
                        rejected[reason] = rejected.get(reason, 0) + 1
                        continue
                    events = sp.events
                    if events:
                        ev_time, ev_name, ev_attrs = _events(events)
                        if ev_time and max(ev_time) > MAX_TIME_NS:
                            rejected["event time after 2262"] = rejected.get("event time after 2262", 0) + 1
                            continue
                    else:
                        ev_time = ev_name = ev_attrs = _NONE
                    links = sp.links
                    if links:
                        ln_tid, ln_sid, ln_state, ln_attrs = _links(links)
                    else:
                        ln_tid = ln_sid = ln_state = ln_attrs = _NONE
                    end = sp.end_time_unix_nano
                    status_code, status_message = statuses(sp.status)
                    append((
                        start, tid.hex(), sid.hex(), pid.hex() if pid != zero8 else "", sp.trace_state,
                        sp.name, kind_name(sp.kind, ""), service, resource, scope_name, scope_version,
                        tuple(map(attrs, sp.attributes[:])), end - start if end > start else 0,
                        status_code, status_message,
                        ev_time, ev_name, ev_attrs, ln_tid, ln_sid, ln_state, ln_attrs,
                    ))
    except DecodeError as e:  # a nested message LazyRequest left as bytes is malformed
        raise OTLPDecodeError(_one_line(f"invalid OTLP protobuf: {e}")) from None
    if rows:
        traces = {name: list(col) for name, col in zip(ROW_COLUMNS, zip(*rows))}
    else:
        traces = {name: [] for name in ROW_COLUMNS}
    n_rejected = sum(rejected.values())
    error = ""
    if n_rejected:
        reasons = "; ".join(f"{reason} ({count})" for reason, count in sorted(rejected.items()))
        error = f"{n_rejected} span(s) rejected: {reasons}"
    return Decoded(traces, spans_to_calls(traces), len(rows), n_rejected, error)


class _AttributeCache(dict[bytes, tuple[str, str]]):
    """KeyValue wire bytes -> (key, value as string), parsed once per distinct encoding in a request."""

    def __missing__(self, raw: bytes) -> tuple[str, str]:
        pair = self[raw] = _key_value(raw)
        return pair


class _StatusCache(dict[bytes, tuple[str, str]]):
    """Status wire bytes -> (StatusCode word, message)."""

    def __missing__(self, raw: bytes) -> tuple[str, str]:
        status = Status.FromString(raw)
        pair = self[raw] = (STATUS_CODES.get(status.code, ""), status.message)
        return pair


def _key_value(raw: bytes) -> tuple[str, str]:
    """One attribute from its wire bytes, with a fast path for short string values."""
    # Canonical encoding of a string attribute with every length under 128:
    # 0x0A klen key 0x12 vlen [0x0A slen value], vlen == slen + 2.
    n = len(raw)
    if n >= 6 and raw[0] == 0x0A:
        k = raw[1]
        if k < 0x80 and n >= k + 6 and raw[k + 2] == 0x12 and raw[k + 4] == 0x0A:
            v, s = raw[k + 3], raw[k + 5]
            if v < 0x80 and s < 0x80 and v == s + 2 and n == k + 6 + s:
                try:
                    return raw[2:k + 2].decode(), raw[k + 6:].decode()
                except UnicodeDecodeError:
                    pass  # the real parser below reports it
    kv = KeyValue.FromString(raw)
    value = kv.value
    return kv.key, value.string_value or _as_string(value)


def _events(events: Any) -> tuple[list[int], list[str], list[tuple[tuple[str, str], ...]]]:
    parsed = [Span.Event.FromString(raw) for raw in events]
    return ([e.time_unix_nano for e in parsed], [e.name for e in parsed],
            [_attributes(e.attributes) for e in parsed])


def _links(links: Any) -> tuple[list[str], list[str], list[str], list[tuple[tuple[str, str], ...]]]:
    parsed = [Span.Link.FromString(raw) for raw in links]
    return ([_hex_id(ln.trace_id) for ln in parsed], [_hex_id(ln.span_id) for ln in parsed],
            [ln.trace_state for ln in parsed], [_attributes(ln.attributes) for ln in parsed])


def _invalid(tid: bytes, sid: bytes, pid: bytes, start: int) -> str:
    """Why a span cannot be stored (the slow path of _decode's check)."""
    if len(tid) != 16:
        return "trace_id must be 16 bytes"
    if tid == _ZERO16:
        return "trace_id is all zero"
    if len(sid) != 8:
        return "span_id must be 8 bytes"
    if sid == _ZERO8:
        return "span_id is all zero"
    if pid and len(pid) != 8:
        return "parent_span_id must be empty or 8 bytes"
    return "start time after 2262"


def _hex_id(raw: bytes) -> str:
    """An id as lowercase hex, '' when empty or all zero (as the exporter writes link ids)."""
    return raw.hex() if raw.strip(b"\0") else ""


def _attributes(kvs: Any) -> tuple[tuple[str, str], ...]:
    return tuple([(kv.key, kv.value.string_value or _as_string(kv.value)) for kv in kvs])


def _as_string(value: Any) -> str:
    """A non-string (or empty) AnyValue as pdata's Value.AsString renders it."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return str(value.int_value)
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "double_value":
        return _double(value.double_value)
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if which == "array_value" or which == "kvlist_value":
        try:
            return _go_json(_raw(value))
        except ValueError:
            return ""  # Go's json.Marshal fails on NaN/Inf, and pdata then renders ''
    return ""


def _raw(value: Any) -> Any:
    """An AnyValue as plain Python data (pdata's AsRaw): str, int, float, bool, bytes, list, dict, None."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "bool_value":
        return value.bool_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value
    if which == "array_value":
        return [_raw(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _raw(kv.value) for kv in value.kvlist_value.values}
    return None


def _double(f: float) -> str:
    """A double as pdata renders it: ES6 number-to-string (Go's encoding/json float format)."""
    if f != f or f in (float("inf"), float("-inf")):
        return "json: unsupported value: " + ("NaN" if f != f else "+Inf" if f > 0 else "-Inf")
    text = repr(f)  # shortest digits that round-trip, as Go's precision -1
    a = abs(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        # exponent form; Go writes e-7 where Python writes e-07
        mantissa, _, exp = text.partition("e")
        sign, digits = exp[0], exp[1:].lstrip("0")
        return f"{mantissa}e{sign}{digits}"
    if "e" in text:
        text = format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text


def _go_json(x: Any) -> str:
    """Compact JSON as Go's json.Marshal writes it: sorted keys, <>& escaped, floats as _double."""
    if isinstance(x, str):
        return (json.dumps(x, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
                .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    if x is None:
        return "null"
    if x is True:
        return "true"
    if x is False:
        return "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError("unsupported value")
        return _double(x)
    if isinstance(x, bytes):
        return '"' + base64.b64encode(x).decode() + '"'
    if isinstance(x, list):
        return "[" + ",".join(_go_json(v) for v in x) + "]"
    return "{" + ",".join(f"{_go_json(k)}:{_go_json(x[k])}" for k in sorted(x)) + "}"


def _parse_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP/JSON to the protobuf message: hex ids turned into bytes, unknown fields ignored."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise OTLPDecodeError(_one_line(f"invalid JSON: {e}")) from None
    if not isinstance(doc, dict):
        raise OTLPDecodeError("invalid OTLP/JSON: the body must be a JSON object")
    for rs in _items(doc, "resourceSpans", "resource_spans"):
        for ss in _items(rs, "scopeSpans", "scope_spans"):
            for sp in _items(ss, "spans"):
                _hex_to_base64(sp, _SPAN_IDS)
                for link in _items(sp, "links"):
                    _hex_to_base64(link, _LINK_IDS)
    msg = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        # json_format nests "Failed to parse X field: " once per level: say it as a path instead.
        text = str(e)
        path = ".".join(_NESTING.findall(text))
        reason = _NESTING.sub("", text).rstrip(".")
        raise OTLPDecodeError(_one_line(f"invalid OTLP/JSON: {path + ': ' if path else ''}{reason}")) from None
    return msg


def _items(obj: Any, *keys: str) -> list[Any]:
    """The objects in obj[key] (first spelling present); anything malformed is left to json_format."""
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
    return []


def _hex_to_base64(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    """OTLP/JSON ids are hex, where protobuf JSON expects base64: rewrite them in place."""
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            try:
                obj[key] = base64.b64encode(binascii.unhexlify(value)).decode()
            except ValueError:
                raise OTLPDecodeError(_one_line(
                    f"invalid OTLP/JSON: {key} {value[:40]!r} is not a hex string")) from None


def _one_line(message: str) -> str:
    """Whitespace collapsed, lone surrogates escaped (the reply must encode), length capped."""
    line = " ".join(message.encode("utf-8", "backslashreplace").decode("utf-8").split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."

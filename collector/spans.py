"""The mapping between spans and calls, both ways, in one place.

`spans_to_calls` turns the HTTP/RPC Server and Client spans of decoded
`otel_traces` columns into `calls` rows (observer "otlp"), reading the
OpenTelemetry semantic conventions under both their old and their current
attribute names. `calls_to_spans` turns call records that carry trace context
into `otel_traces` rows written with the current names, so a request through
several sidecars shows up as one trace. Only sidecar records (client, server) become
spans: the `traceparent` the tap reads off the wire names the sender's span, which
that sender (a sidecar or an instrumented app) reports itself; a span from the tap
would duplicate its id.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from meshlens.collector.columns import TRACES_COLUMNS
from meshlens.collector.record import AT, CALL_COLUMN_NAMES, CALL_COLUMNS, DEFAULT_ROW

U16_MAX = 2**16 - 1
U64_MAX = 2**64 - 1
I16_MAX = 2**15 - 1

# Any of these on a Server/Client span makes it an HTTP call.
HTTP_KEYS = frozenset({
    "http.request.method", "http.method", "http.response.status_code", "http.status_code",
    "url.full", "http.url", "url.path", "http.target", "http.route",
})

# gRPC status names, for the stable RPC conventions' string `rpc.response.status_code`.
GRPC_CODES: dict[str, int] = {name: i for i, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
))}
GRPC_NAMES: dict[int, str] = {i: name for name, i in GRPC_CODES.items()}
# Codes that make a gRPC *server* span an error (RPC semconv); on a client, every code but OK does.
GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})

# What an `error.type` value (exception class, errno name, gRPC code, Go error text) says
# about the failure, as the error classes of `calls.error`; the first match wins and
# other values are kept as sent. ssl/tls must start a word: "ClassLoader" is no TLS error.
ERROR_CLASSES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.IGNORECASE), cls) for p, cls in (
    (r"time_?d?_?out|deadline", "timeout"),
    (r"refused", "refused"),
    (r"reset", "reset"),
    (r"(?<![a-z])(ssl|tls)|certificate|x509|handshake", "tls_error"),
))

# What a span never says about a call: spans_to_calls leaves these columns out and
# collector.columns.to_table fills their defaults.
NOT_FROM_SPANS = frozenset({"dst_subset", "peer_identity", "mode", "action", "attempt", "response_flags"})
# The `calls` columns an otlp row fills, in CALL_COLUMNS order.
OTLP_CALL_COLUMNS: tuple[str, ...] = tuple(n for n in CALL_COLUMN_NAMES if n not in NOT_FROM_SPANS)
_OTLP_AT: tuple[int, ...] = tuple(getattr(AT, n) for n in OTLP_CALL_COLUMNS)

# The `otel_traces` columns calls_to_spans fills, in the order of the tuples it builds
# (the exporter's layout, fixed); Events.* and Links.* take their defaults.
CALL_SPAN_COLUMNS: tuple[str, ...] = tuple(n for n in TRACES_COLUMNS if "." not in n)

# The `calls` columns calls_to_spans reads, in the order its loop unpacks them.
_SPAN_INPUTS: tuple[str, ...] = (
    "time", "duration_ns", "observer", "observer_id", "trace_id", "span_id", "parent_span_id",
    "src_service", "src_instance", "src_addr", "src_port", "dst_service", "dst_addr", "dst_port",
    "protocol", "method", "authority", "path", "route", "status", "grpc_status",
    "request_bytes", "response_bytes", "error", "response_flags", "tls", "mode", "action", "peer_identity", "attempt",
    "attributes",
)
_CALL_DEFAULTS: dict[str, Any] = {c.name: c.default() for c in CALL_COLUMNS}
_HTTP_PROTOCOLS = {"http/1.1": "1.1", "h2": "2"}


def spans_to_calls(traces: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """`calls` columns for the HTTP/RPC Server and Client spans among decoded `otel_traces` columns."""
    rows: list[list[Any]] = []
    append = rows.append
    instances: dict[int, str] = {}
    names: dict[str, tuple[tuple[str, str], ...]] = {}  # span name -> its (shared) attributes map
    # Per-batch memos: statuses, ports and sizes repeat, and a dict lookup beats int() + range checks.
    u16 = _IntMemo(0, U16_MAX, 0).__getitem__
    u64 = _IntMemo(0, U64_MAX, 0).__getitem__
    columns = zip(traces["SpanKind"], traces["SpanAttributes"], traces["ResourceAttributes"],
                  traces["ServiceName"], traces["SpanName"], traces["Timestamp"], traces["Duration"],
                  traces["TraceId"], traces["SpanId"], traces["ParentSpanId"])
    for kind, span_attrs, resource, service, span_name, start, duration, tid, sid, pid in columns:
        if kind == "Server":
            server = True
        elif kind == "Client":
            server = False
        else:
            continue
        a = dict(span_attrs)
        get = a.get
        rpc = get("rpc.system") or get("rpc.system.name") or ""
        if not rpc and "http.request.method" not in a and HTTP_KEYS.isdisjoint(a):
            continue  # the first test is the common case, and 5x cheaper than isdisjoint
        instance = instances.get(id(resource))
        if instance is None:
            r = dict(resource)
            instance = instances[id(resource)] = r.get("service.instance.id") or r.get("host.name") or ""
        url = get("url.full") or get("http.url") or ""
        scheme = get("url.scheme") or get("http.scheme") or (url.partition(":")[0].lower() if "://" in url else "")
        tls = scheme == "https"

        method = get("http.request.method") or get("http.method") or ""
        if method == "_OTHER":
            method = get("http.request.method_original") or method
        path = get("url.path") or _strip_query(get("http.target") or "") or (_url_part(url, "path") if url else "")
        version = get("network.protocol.version") or get("http.flavor")
        protocol = "h2" if version == "2" or version == "2.0" else "http/1.1"
        grpc_status = -1
        if rpc:
            if rpc == "grpc":
                protocol = "grpc"
            method = _rpc_method(get("rpc.service") or "", get("rpc.method") or "", span_name) or method
            path = path or method
            code = get("rpc.grpc.status_code") or get("rpc.response.status_code") or ""
            grpc_status = GRPC_CODES[code] if code in GRPC_CODES else _int(code, 0, I16_MAX, -1)

        port = get("server.port") or get("net.host.port" if server else "net.peer.port") or ""
        host = get("server.address")
        host_name = host or (None if "http.host" in a else get("net.host.name" if server else "net.peer.name"))
        if host_name:  # a host name and a port attribute: the port shows when it is not the scheme's default
            authority = host_name if port == "" or port == ("443" if tls else "80") else f"{host_name}:{port}"
        else:  # http.host is already host[:port] as the client sent it
            authority = get("http.host") or (_url_part(url, "netloc") if url else "")

        if server:
            src_service, dst_service, src_instance = get("peer.service") or "", service, ""
            src_addr = (get("client.address") or get("network.peer.address") or get("net.sock.peer.addr")
                        or get("net.peer.ip") or "")
            src_port = (get("client.port") or get("network.peer.port") or get("net.sock.peer.port")
                        or get("net.peer.port"))
            dst_addr = get("network.local.address") or get("net.sock.host.addr") or get("net.host.ip") or ""
            dst_port = port or get("network.local.port") or get("net.sock.host.port")
        else:
            src_service, dst_service = service, get("peer.service") or host or get("net.peer.name") or ""
            src_instance = instance
            src_addr = get("network.local.address") or get("net.sock.host.addr") or ""
            src_port = get("network.local.port") or get("net.sock.host.port")
            dst_addr = get("network.peer.address") or get("net.sock.peer.addr") or get("net.peer.ip") or ""
            dst_port = port or get("network.peer.port") or get("net.sock.peer.port")

        extra = names.get(span_name) or names.setdefault(span_name, (("span.name", span_name),))
        error = get("error.type") or ""
        if error:
            cls = error_class(error)
            if cls and cls != error:  # keep what the app said when it was normalized to a class
                extra = (*extra, ("error.type", error))
            error = cls
        # Filled by column position (record.AT): the order of the calls columns is written only in
        # Call. It costs ~0.7 µs a span over a tuple written out in that order (3.6 -> 4.3 µs for
        # spans_to_calls, measured). Rows stay lists: tuple(row) measured slower still (4.6 µs).
        row = list(DEFAULT_ROW)
        row[AT.time], row[AT.duration_ns], row[AT.observer], row[AT.observer_id] = start, duration, "otlp", instance
        row[AT.trace_id], row[AT.span_id], row[AT.parent_span_id] = tid, sid, pid
        row[AT.src_service], row[AT.src_instance] = src_service, src_instance
        row[AT.src_addr], row[AT.src_port] = src_addr, u16(src_port)
        row[AT.dst_service], row[AT.dst_addr], row[AT.dst_port] = dst_service, dst_addr, u16(dst_port)
        row[AT.protocol], row[AT.method], row[AT.authority], row[AT.path] = protocol, method, authority, path
        row[AT.route] = get("http.route") or ""
        row[AT.status] = u16(get("http.response.status_code") or get("http.status_code"))
        row[AT.grpc_status] = grpc_status
        row[AT.request_bytes] = u64(get("http.request.body.size") or get("http.request_content_length"))
        row[AT.response_bytes] = u64(get("http.response.body.size") or get("http.response_content_length"))
        row[AT.error], row[AT.tls], row[AT.attributes] = error, tls, extra
        append(row)
    if not rows:
        return {}
    columns = list(zip(*rows))
    return {name: list(columns[i]) for name, i in zip(OTLP_CALL_COLUMNS, _OTLP_AT)}


class _IntMemo(dict[Any, int]):
    """Attribute string -> int in [lo, hi] (else the default), computed once per distinct string."""

    def __init__(self, lo: int, hi: int, default: int) -> None:
        super().__init__({None: default, "": default})
        self.lo, self.hi, self.default = lo, hi, default

    def __missing__(self, value: str) -> int:
        n = self[value] = _int(value, self.lo, self.hi, self.default)
        return n


def error_class(error_type: str) -> str:
    """`calls.error` for an `error.type` value: '' for an HTTP status code, a known class, or the value."""
    if error_type.isdigit():
        return ""  # HTTP semconv puts the status code here for 4xx/5xx: a status, not a failure class
    for pattern, cls in ERROR_CLASSES:
        if pattern.search(error_type):
            return cls
    return error_type


def calls_to_spans(calls: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """`otel_traces` columns for the call rows that carry trace context (trace_id and span_id)."""
    n = max((len(v) for v in calls.values()), default=0)
    columns = [calls.get(name) or [_CALL_DEFAULTS[name]] * n for name in _SPAN_INPUTS]
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for (time, duration, observer, observer_id, trace_id, span_id, parent_span_id, src_service, src_instance,
         src_addr, src_port, dst_service, dst_addr, dst_port, protocol, method, authority, path, route, status,
         grpc_status, request_bytes, response_bytes, error, response_flags, tls, mode, action, peer_identity, attempt,
         extra) in zip(*columns):
        if not trace_id or not span_id or observer not in ("client", "server"):
            continue
        client = observer == "client"
        attrs: dict[str, str] = {}
        version = _HTTP_PROTOCOLS.get(protocol)
        if protocol == "grpc":
            rpc_method = method.lstrip("/")
            name = rpc_method or "grpc"  # RPC semconv span name: "{service}/{method}"
            attrs["rpc.system.name"] = "grpc"
            if rpc_method:
                attrs["rpc.method"] = rpc_method
            if grpc_status >= 0:
                attrs["rpc.response.status_code"] = GRPC_NAMES.get(grpc_status, str(grpc_status))
            attrs["network.protocol.name"], attrs["network.protocol.version"] = "http", "2"
            failed = grpc_status > 0 and (client or grpc_status in GRPC_SERVER_ERRORS)
        elif version is not None:
            # HTTP semconv span name: "{method} {route}", or "{method}" alone when the
            # route is unknown - a raw path would make SpanName (in the ORDER BY) unbounded.
            name = f"{method or 'HTTP'} {route}" if route else (method or "HTTP")
            if method:
                attrs["http.request.method"] = method
            if status:
                attrs["http.response.status_code"] = str(status)
            if path:
                attrs["url.path"] = path
            if route:
                attrs["http.route"] = route
            attrs["url.scheme"] = "https" if tls else "http"
            attrs["network.protocol.name"], attrs["network.protocol.version"] = "http", version
            failed = status >= (400 if client else 500)
        else:  # tcp, tls, or not recorded: a connection
            name = protocol or "tcp"
            attrs["network.transport"] = "tcp"
            failed = False
        peer_service = dst_service if client else src_service
        if peer_service:
            attrs["peer.service"] = peer_service
        host, port = _split_authority(authority)
        host, port = host or dst_addr, port or dst_port
        if host:
            attrs["server.address"] = host
        if port:
            attrs["server.port"] = str(port)
        if not client and src_addr:
            attrs["client.address"] = src_addr
            if src_port:
                attrs["client.port"] = str(src_port)
        peer_addr, peer_port = (dst_addr, dst_port) if client else (src_addr, src_port)
        if peer_addr:
            attrs["network.peer.address"] = peer_addr
            if peer_port:
                attrs["network.peer.port"] = str(peer_port)
        if request_bytes:
            attrs["http.request.body.size" if version else "meshlens.request_bytes"] = str(request_bytes)
        if response_bytes:
            attrs["http.response.body.size" if version else "meshlens.response_bytes"] = str(response_bytes)
        if error:
            attrs["error.type"] = error
        if response_flags:
            attrs["meshlens.response_flags"] = response_flags  # as Envoy's tracer tags its spans
        attrs["meshlens.observer"] = observer
        if mode:
            attrs["meshlens.mode"] = mode
        if action:
            attrs["meshlens.action"] = action
        if peer_identity:
            attrs["meshlens.peer_identity"] = peer_identity
        if attempt:
            attrs["meshlens.attempt"] = str(attempt)
        for key, value in (extra.items() if isinstance(extra, dict) else extra or ()):
            attrs.setdefault(key, value)

        if client:
            service, instance = src_service, src_instance or observer_id
        else:
            service, instance = dst_service, observer_id
        resource = (("service.name", service), ("service.instance.id", instance)) if instance else (
            ("service.name", service),)
        append((time, trace_id, span_id, parent_span_id, "", name, "Client" if client else "Server", service,
                resource, "meshlens", "", tuple(attrs.items()), duration,
                "Error" if failed or error else "Unset", error))
    if not rows:
        return {name: [] for name in CALL_SPAN_COLUMNS}
    return {name: list(col) for name, col in zip(CALL_SPAN_COLUMNS, zip(*rows))}


def _int(value: Any, lo: int, hi: int, default: int) -> int:
    """An attribute's string form as an int in [lo, hi], or default."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        return default
    return n if lo <= n <= hi else default


def _strip_query(target: str) -> str:
    return target.partition("?")[0].partition("#")[0]


def _url_part(url: str, part: str) -> str:
    """The path (or the host[:port], without user info) of an absolute URL; '' if it does not parse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if part == "netloc":
        return parts.netloc.rpartition("@")[2]
    return parts.path or ("/" if parts.netloc else "")


def _rpc_method(service: str, method: str, span_name: str) -> str:
    """The gRPC method path "/pkg.Service/Method" from old (service + method) or stable (full method) names."""
    if service and method:
        return f"/{service}/{method}"
    if "/" in method:
        return "/" + method.lstrip("/")
    if "/" in span_name and " " not in span_name:
        return "/" + span_name.lstrip("/")
    return method


def _split_authority(authority: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' as (host, port), port 0 when absent; brackets dropped as in server.address."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        return host, _int(rest[1:], 0, U16_MAX, 0) if rest.startswith(":") else 0
    if authority.count(":") != 1:
        return authority, 0  # no port, or a bare IPv6 address
    host, _, port = authority.partition(":")
    return host, _int(port, 0, U16_MAX, 0)

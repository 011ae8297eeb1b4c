"""HTTP/2 heads as the exchange reads them, and what the sidecar sends as HTTP/2 fields: pure functions.

The exchange (proxy/exchange.py) reads a request head and a response head through a few
attributes (method, path, authority, status, the trace context, ...), which HTTP/1.1 heads
(meshlens.protocols.http1) have. `H2RequestHead` and `H2ResponseHead` have the same, read
from an HTTP/2 field list, plus that list (`fields`, pseudo-fields and the proxy's own taken
out) for what is forwarded. Routing and authorization match header fields on a head's `raw`
HTTP/1.1 text: an HTTP/2 head builds that text when first asked (a rule with header
matches), never otherwise.

gRPC (a request whose content-type is application/grpc*): the route is the method path
`/package.Service/Method`; `grpc-timeout` is read as a deadline (gRPC over HTTP/2,
PROTOCOL-HTTP2.md: `Timeout → "grpc-timeout" TimeoutValue TimeoutUnit`, at most 8 digits);
a reply the sidecar makes itself is trailers-only, HTTP 200 with `grpc-status` and
`grpc-message`, the code mapped from the HTTP status as gRPC's http-grpc-status-mapping.md
says, except that a timeout is DEADLINE_EXCEEDED (as Envoy's router answers since 2026:
UNAVAILABLE would tell the client to retry what already ran out of time).
"""
from __future__ import annotations

from functools import cached_property
from urllib.parse import quote, unquote

from meshlens.protocols.errors import PeerError
from meshlens.proxy.headers import HOP_BY_HOP, PEER_HEADER, Trace

__all__ = ["GRPC_DEADLINE_EXCEEDED", "GRPC_UNAVAILABLE", "H2RequestHead", "H2ResponseHead", "Fields",
           "grpc_code_for", "grpc_of_h1", "grpc_timeout", "h1_response_head", "http_status_of_grpc", "local_reply_fields", "request_fields",
           "request_fields_from_h1", "request_head", "response_fields", "response_head", "trailer_block",
           "trailers_of", "Unchunk", "h1_request_head", "fields_of_h1_response"]

Fields = list[tuple[bytes, bytes]]

GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE = 4, 14
# gRPC's http-grpc-status-mapping.md: the code a client takes from an HTTP status when no grpc-status came.
_GRPC_OF_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_GRPC_UNKNOWN = 2
# gRPC's TimeoutUnit letters -> seconds.
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Fields the proxy writes itself or that HTTP/2 forbids (RFC 9113 8.2.2), never forwarded as received.
_OWN = frozenset({b"traceparent", PEER_HEADER, b"host"})
_NOT_FORWARDED = HOP_BY_HOP | {b"transfer-encoding", b"http2-settings"}
_REASONS = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 400: b"Bad Request", 404: b"Not Found",
            500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}


def grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout`'s value in seconds; None when it is not one (a client's garbage is not a deadline)."""
    digits, unit = value[:-1], value[-1:]
    if not digits or len(digits) > 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


class H2RequestHead:
    """One HTTP/2 request's head; the attributes RequestHead has, defaults as its (no __init__ cost)."""

    method = ""
    target = b""
    path = ""
    authority = ""
    scheme = b"http"
    version = "2"
    keep_alive = True
    upgrade = False
    content_length = -1
    chunked = False
    hop_by_hop = False
    connection = b""
    host: bytes | None = None
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    request_id: bytes | None = None
    extra: dict[bytes, bytes] | None = None
    grpc = False
    """content-type application/grpc (or +proto, ...): a gRPC call."""
    deadline: float | None = None
    """The client's grpc-timeout, in seconds."""
    fields: Fields = []
    """Every field but the pseudo-fields and the proxy's own (traceparent, x-meshlens-peer, host)."""

    def __repr__(self) -> str:
        return f"<H2RequestHead {self.method} {self.target!r}>"

    @cached_property
    def raw(self) -> bytes:
        """The head as HTTP/1.1 text, for what matches fields on it (routing's header rules, authorization)."""
        lines = [b"%s %s HTTP/2" % (self.method.encode(), self.target), b"host: " + (self.host or b"")]
        lines += [name + b": " + value for name, value in self.fields]
        if self.extra:
            lines += [name + b": " + value for name, value in self.extra.items()]
        return b"\r\n".join(lines) + b"\r\n\r\n"


def request_head(headers: Fields) -> H2RequestHead:
    """A request's head from its decoded HEADERS (h2 checked them as RFC 9113 8.3 says: pseudo-fields first,
    :method and :path present, no connection-specific field). Raises PeerError for what it leaves to us."""
    head = H2RequestHead()
    fields: Fields = []
    authority = host = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                head.method = value.decode("latin-1")
            elif name == b":path":
                head.target = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                head.scheme = value
            elif name == b":protocol":
                raise PeerError("extended CONNECT (RFC 8441) is not served", status=501)
            continue
        if name in _OWN:
            if name == b"traceparent":
                head.traceparent = value
            elif name == b"host":
                host = value
            else:
                head.extra = {name: value}
            continue
        if name == b"tracestate":
            head.tracestate = value
        elif name == b"x-request-id":
            head.request_id = value
        elif name == b"content-type":
            head.grpc = value.startswith(b"application/grpc")
        elif name == b"grpc-timeout":
            head.deadline = grpc_timeout(value)
        elif name == b"content-length":
            head.content_length = int(value) if value.isdigit() else -1
        fields.append((name, value))
    if head.method == "CONNECT":
        raise PeerError("CONNECT over HTTP/2 is not served: the outbound listener takes HTTP/1.1 CONNECT", status=405)
    head.host = authority if authority is not None else host
    head.authority = (head.host or b"").decode("latin-1")
    head.path = head.target.partition(b"?")[0].decode("latin-1")
    head.fields = fields
    return head


def _h1_fields(raw: bytes) -> tuple[Fields, frozenset[bytes]]:
    """An HTTP/1.1 head's field lines, names lowercased, and the names HTTP/2 does not carry: hop-by-hop, framing,
    and those its Connection field names (RFC 9113 8.2.2)."""
    pairs: Fields = []
    named: set[bytes] = set()
    for line in raw[:-4].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
        pairs.append((name, value))
    return pairs, _NOT_FORWARDED | named


def grpc_of_h1(head: object) -> bool:
    """Whether an HTTP/1.1 request for a destination that speaks HTTP/2 is a gRPC call (content-type
    application/grpc*), read once; when it is, its grpc-timeout (if one) is set as `head.deadline` in seconds, as
    an HTTP/2 head's."""
    grpc, deadline = False, None
    for name, value in _h1_fields(head.raw)[0]:  # type: ignore[attr-defined]
        if name == b"content-type":
            grpc = value.startswith(b"application/grpc")
        elif name == b"grpc-timeout":
            deadline = grpc_timeout(value)
    if grpc and deadline is not None:
        head.deadline = deadline  # type: ignore[attr-defined]  # RequestHead.deadline
    return grpc


def _peer(peer_field: bytes) -> bytes:
    """The value of an `x-meshlens-peer: SERVICE\\r\\n` line (Env.peer_field)."""
    return peer_field[len(PEER_HEADER) + 2:-2]


def request_fields(head: H2RequestHead, trace: Trace, new_id: bytes | None, peer_field: bytes) -> Fields:
    """What goes upstream as the request's HEADERS: the pseudo-fields, the client's fields, ours."""
    out = [(b":method", head.method.encode()), (b":scheme", head.scheme), (b":authority", head.host or b""),
           (b":path", head.target), *head.fields, (b"traceparent", trace.header())]
    if new_id is not None:
        out.append((b"x-request-id", new_id))
    if peer_field:
        out.append((PEER_HEADER, _peer(peer_field)))
    return out


def request_fields_from_h1(head: object, trace: Trace, new_id: bytes | None, peer_field: bytes) -> Fields:
    """An HTTP/1.1 request (meshlens.protocols.http1.RequestHead) as HTTP/2 fields, for a destination that speaks
    HTTP/2: names lowercased, Host as :authority, hop-by-hop and framing fields out (RFC 9113 8.2.2)."""
    pairs, drop = _h1_fields(head.raw)  # type: ignore[attr-defined]
    drop |= _OWN
    authority = head.host or b""  # type: ignore[attr-defined]
    target = head.target  # type: ignore[attr-defined]
    if target[:1] != b"/" and b"://" in target:  # absolute-form: its authority and path
        rest = target.split(b"://", 1)[1]
        auth, slash, path = rest.partition(b"/")
        authority, target = auth or authority, slash + path or b"/"
    out = [(b":method", head.method.encode()), (b":scheme", b"http"),  # type: ignore[attr-defined]
           (b":authority", authority), (b":path", target)]
    out += [(n, v) for n, v in pairs if n not in drop or (n == b"te" and v.lower() == b"trailers")]
    out.append((b"traceparent", trace.header()))
    if new_id is not None:
        out.append((b"x-request-id", new_id))
    if peer_field:
        out.append((PEER_HEADER, _peer(peer_field)))
    return out


class H2ResponseHead:
    """One HTTP/2 response head (or a trailers-only response); the attributes ResponseHead has."""

    status = 0
    version = "2"
    keep_alive = False
    """Its stream ends with it: never pooled (the exchange closes the stream; the connection is H2Pool's)."""
    interim = False
    upgraded = False
    content_length = -1
    chunked = False
    hop_by_hop = False
    connection = b""
    method = ""
    raw = b""
    """The head as HTTP/1.1 bytes when the client speaks HTTP/1.1 (`h1_response_head`), else b''."""
    grpc_status = -1
    """grpc-status when the response carries it in its head (trailers-only), else from the trailers; -1: none."""
    grpc_message = ""
    fields: Fields = []
    """Its fields but :status."""
    trailers: Fields | None = None
    alone = False
    """The response is this head alone (END_STREAM on it): a gRPC trailers-only response must stay one HEADERS."""

    def __repr__(self) -> str:
        return f"<H2ResponseHead {self.status} grpc={self.grpc_status}>"


def response_head(headers: Fields, method: str) -> H2ResponseHead:
    """A response's head from its decoded HEADERS; PeerError when :status is missing or not three digits."""
    head = H2ResponseHead()
    head.method = method
    fields: Fields = []
    for name, value in headers:
        if name == b":status":
            if len(value) != 3 or not value.isdigit():
                raise PeerError(f"response :status {value[:16]!r} is not three digits", status=502)
            head.status = int(value)
            continue
        if name[:1] == b":":
            continue
        if name == b"content-length":
            head.content_length = int(value) if value.isdigit() else -1
        elif name == b"grpc-status" or name == b"grpc-message":
            _grpc(head, name, value)
        if name not in _NOT_FORWARDED:
            fields.append((name, value))
    if not head.status:
        raise PeerError("response without :status", status=502)
    head.interim = 100 <= head.status < 200
    head.fields = fields
    return head


def trailers_of(head: H2ResponseHead, trailers: Fields) -> None:
    """The response's trailers: kept for the client, and grpc-status / grpc-message read from them."""
    kept = []
    for name, value in trailers:
        if name == b"grpc-status" or name == b"grpc-message":
            _grpc(head, name, value)
        if name[:1] != b":" and name not in _NOT_FORWARDED:
            kept.append((name, value))
    head.trailers = kept


def _grpc(head: H2ResponseHead, name: bytes, value: bytes) -> None:
    if name == b"grpc-status":
        head.grpc_status = int(value) if value.isdigit() and len(value) <= 2 else _GRPC_UNKNOWN
    else:
        head.grpc_message = unquote(value.decode("ascii", "replace"))[:256]  # percent-encoded UTF-8 (gRPC's spec)


def response_fields(head: H2ResponseHead) -> Fields:
    return [(b":status", b"%d" % head.status), *head.fields]


def fields_of_h1_response(head: object) -> Fields:
    """An HTTP/1.1 response head (meshlens.protocols.http1.ResponseHead) as HTTP/2 fields for an HTTP/2 client:
    names lowercased, hop-by-hop and framing fields out (the stream frames the body)."""
    pairs, drop = _h1_fields(head.raw)  # type: ignore[attr-defined]
    return [(b":status", b"%d" % head.status)] + [(n, v) for n, v in pairs if n not in drop]  # type: ignore[attr-defined]


def h1_request_head(head: H2RequestHead, trace: Trace, new_id: bytes | None, peer_field: bytes,
                    body_bytes: int | None) -> tuple[bytes, bool]:
    """An HTTP/2 request as an HTTP/1.1 head for a destination declared http, and whether its body goes chunked:
    `body_bytes` is the whole body's length when the request is complete already (None: more may come)."""
    lines = [b"%s %s HTTP/1.1" % (head.method.encode(), head.target or b"/"), b"host: " + (head.host or b"")]
    has_length = head.content_length >= 0
    lines += [n + b": " + v for n, v in head.fields if n != b"te"]
    lines.append(b"traceparent: " + trace.header())
    if new_id is not None:
        lines.append(b"x-request-id: " + new_id)
    chunked = False
    if not has_length:
        if body_bytes is None:
            lines.append(b"transfer-encoding: chunked")
            chunked = True
        elif body_bytes or head.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(b"content-length: %d" % body_bytes)
    return b"\r\n".join(lines) + b"\r\n" + peer_field + b"\r\n", chunked


def h1_response_head(head: H2ResponseHead) -> tuple[bytes, bool]:
    """The HTTP/1.1 head for a client of an HTTP/2 response, and whether its body is sent chunked (no
    content-length: the end of the stream ends the body, and trailers can follow, RFC 9112 7.1)."""
    lines = [b"HTTP/1.1 %d %s" % (head.status, _REASONS.get(head.status, b"Status"))]
    lines += [name + b": " + value for name, value in head.fields]
    chunked = head.content_length < 0 and head.status not in (204, 304) and head.method != "HEAD" \
        and not 100 <= head.status < 200
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n", chunked


def trailer_block(trailers: Fields | None) -> bytes:
    """The last chunk of a chunked HTTP/1.1 body, with the trailers as its trailer section."""
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers or ()) + b"\r\n"


# Envoy's Grpc::Utility::grpcToHttpStatus: what outlier detection counts a gRPC status as.
_HTTP_OF_GRPC = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)


def http_status_of_grpc(code: int) -> int:
    return _HTTP_OF_GRPC[code] if 0 <= code < len(_HTTP_OF_GRPC) else 500


def grpc_code_for(status: int, error: str) -> int:
    """The gRPC code of a reply the sidecar makes itself to a gRPC request."""
    if error == "timeout":
        return GRPC_DEADLINE_EXCEEDED
    return _GRPC_OF_HTTP.get(status, _GRPC_UNKNOWN)


def local_reply_fields(status: int, text: str, error: str, grpc: bool, extra: Fields) -> tuple[Fields, bytes]:
    """A reply of the sidecar's own: (HEADERS, body). For gRPC a trailers-only response, else plain text."""
    if grpc:
        code = grpc_code_for(status, error)
        return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code),
                (b"grpc-message", quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()),
                *extra], b""
    body = text.encode("utf-8", "replace") + b"\n"
    return [(b":status", b"%d" % status), (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)), *extra], body


class Unchunk:
    """A chunked HTTP/1.1 body (already checked by the codec, meshlens.protocols.http1) to its bytes."""

    __slots__ = ("buf", "left", "state")

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0
        self.state = 0  # 0 size line, 1 data, 2 the CRLF after data, 3 trailer lines, 4 done

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        while pos < len(buf) and self.state != 4:
            if self.state == 1:
                take = min(self.left, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = 2
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if self.state == 0:
                self.left = int(line.split(b";", 1)[0].strip(), 16)
                self.state = 1 if self.left else 3
            elif self.state == 2:
                self.state = 0
            elif not line:  # the empty line after the trailers
                self.state = 4
        self.buf = buf[pos:]
        return b"".join(out)

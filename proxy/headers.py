"""What the proxy changes in a message head, as pure functions over bytes.

RFC 9110 7.6.1: hop-by-hop fields (Connection, the fields it names, Keep-Alive,
Proxy-Connection, TE, Transfer-Encoding, Upgrade) are not forwarded; the proxy
frames each hop itself. W3C Trace Context: an incoming `traceparent` is continued
with a new span id (the incoming span becomes the parent), else one is started;
`tracestate` passes unchanged; `x-request-id` is added when absent.
Every other field passes byte for byte, in order, with its original case.
"""
from __future__ import annotations

import re
from random import getrandbits

__all__ = ["HOP_BY_HOP", "Trace", "forwardable", "hop_by_hop_names", "new_request_id", "trace_for", "upgrade_fields"]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"transfer-encoding", b"upgrade"})
_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


class Trace:
    """The trace context of one exchange: what is recorded and what goes upstream."""

    __slots__ = ("trace_id", "span_id", "parent_span_id", "flags")

    def __init__(self, trace_id: str, span_id: str, parent_span_id: str, flags: str) -> None:
        self.trace_id, self.span_id, self.parent_span_id, self.flags = trace_id, span_id, parent_span_id, flags

    def header(self) -> bytes:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}".encode()


def trace_for(traceparent: bytes | None) -> Trace:
    """Continue a valid version-00 `traceparent` (new span, incoming span as parent), else start one."""
    span = f"{getrandbits(64) or 1:016x}"
    if traceparent is not None:
        m = _TRACEPARENT.fullmatch(traceparent.strip())
        if m is not None and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN:
            return Trace(m.group(1).decode(), span, m.group(2).decode(), m.group(3).decode())
    return Trace(f"{getrandbits(128) or 1:032x}", span, "", "01")


def new_request_id() -> bytes:
    """A UUID4-shaped random id, as Envoy generates for x-request-id."""
    h = f"{getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}".encode()


def hop_by_hop_names(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """HOP_BY_HOP plus every field named in Connection (lowercase)."""
    extra = [tok.strip().lower() for name, value in headers if name.lower() == b"connection"
             for tok in value.split(b",")]
    return HOP_BY_HOP.union(t for t in extra if t) if extra else HOP_BY_HOP


def upgrade_fields(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The Upgrade field(s) of a head and `connection: upgrade`, serialized.

    RFC 9110 7.8: an intermediary that takes part in an upgrade forwards these two
    hop-by-hop fields (request and 101 alike), else the next hop cannot switch."""
    return b"".join(n + b": " + v + b"\r\n" for n, v in headers if n.lower() == b"upgrade") + b"connection: upgrade\r\n"


def forwardable(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool, bool]:
    """One pass over a head: (the fields to forward, serialized; chunked?; has Content-Length?).

    Hop-by-hop fields, including those Connection names, are left out."""
    out: list[bytes] = []
    chunked = has_length = False
    named: list[bytes] | None = None
    for n, v in headers:
        ln = n.lower()
        if ln in HOP_BY_HOP:
            if ln == b"transfer-encoding":
                chunked = chunked or b"chunked" in v.lower()
            elif ln == b"connection":
                named = (named or []) + [t.strip().lower() for t in v.split(b",") if t.strip()]
            continue
        if ln == b"content-length":
            has_length = True
        out.append(n + b": " + v + b"\r\n")
    if named:  # rare: Connection names extra fields, which may come before it
        drop = hop_by_hop_names(headers)
        out = [n + b": " + v + b"\r\n" for n, v in headers if n.lower() not in drop]
    return b"".join(out), chunked, has_length


# -- the caller's service, sidecar to sidecar ------------------------------------------------------
# An outbound sidecar adds `x-meshlens-peer: SERVICE` (its own service) to every request it
# forwards; the callee's inbound sidecar reads it to fill the record's src_service when the
# caller's address does not name a service (loopback, NAT), and strips it before the app sees
# it. Outbound sidecars strip any copy the app sent, and answer 508 to a request carrying their
# own name (it already went through them: a redirect loop). Like Istio's x-envoy-peer-metadata,
# it is a claim, not an identity: mTLS peer identities are what enforcement will trust.
PEER_HEADER = b"x-meshlens-peer"


def peer_field(service: str) -> bytes:
    """The serialized `x-meshlens-peer` field an outbound sidecar of `service` adds."""
    return PEER_HEADER + b": " + service.encode("ascii") + b"\r\n"

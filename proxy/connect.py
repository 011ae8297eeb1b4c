"""Opening upstream connections, and what a failure is called: the only place either happens.

Every upstream connection the sidecar opens comes through `open_connection`: an HTTP
pool miss (proxy/upstream.py), a CONNECT tunnel and a passed-through connection
(proxy/passthrough.py). A failure becomes one `LocalReply` (status, text, error class
for the record's `error` column, Envoy-style response flags), so the same failure is
answered and recorded the same way on every path: refused, timed out or unreachable is
503 `UF`, as Envoy answers an upstream connection failure.

The response flags are Envoy's (`%RESPONSE_FLAGS%`, configuration/observability/
access_log/usage), named here once: the record's `response_flags` column carries them,
comma-separated, '' when none.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from meshlens.proxy.mtls import SESSIONS, TlsClient

__all__ = ["CONNECT_TIMEOUT", "DC", "DPE", "LR", "NR", "UC", "UF", "UH", "UO", "UPE", "UPSTREAM_PROTOCOL_ERROR",
           "UPSTREAM_REFUSED_STREAM", "UPSTREAM_RESET", "UR", "URX", "UT", "LocalReply", "failure", "no_endpoint", "open_connection"]

# Envoy's cluster connect_timeout default is 5 s (nginx proxy_connect_timeout 60 s).
CONNECT_TIMEOUT = 5.0

# -- Envoy's response flags: what each means in Envoy's access log ----------------------------
UF = "UF"
"""Upstream connection failure, in addition to a 503."""
UH = "UH"
"""No healthy upstream hosts in the upstream cluster, in addition to a 503."""
UO = "UO"
"""Upstream overflow (circuit breaking), in addition to a 503."""
URX = "URX"
"""Rejected because the upstream retry limit (HTTP) or maximum connect attempts (TCP) was reached."""
UT = "UT"
"""Upstream request timeout, in addition to a 504."""
UC = "UC"
"""Upstream connection termination, in addition to a 503."""
UR = "UR"
"""Upstream remote reset, in addition to a 503."""
UPE = "UPE"
"""The upstream response had an HTTP protocol error."""
DC = "DC"
"""Downstream connection termination."""
DPE = "DPE"
"""The downstream request had an HTTP protocol error."""
NR = "NR"
"""No route configured for the request (with a 404), or no matching filter chain for a downstream connection."""
LR = "LR"
"""Connection local reset, in addition to a 503."""


class LocalReply(NamedTuple):
    """An answer the sidecar gives itself instead of an upstream's, and how the record names it."""

    status: int
    text: str
    """One line, the plain-text body."""
    error: str
    """The record's `error` class: refused, timeout, reset, protocol_error, no_healthy_upstream, loop, ..."""
    flags: str = ""
    """Envoy-style response flags for the record's `response_flags` column."""
    headers: bytes = b""
    """Field lines added to the reply's head, each ending in CRLF (a 429's x-ratelimit-*)."""


UPSTREAM_RESET = LocalReply(503, "upstream reset the connection before responding", "reset", UC)
UPSTREAM_PROTOCOL_ERROR = LocalReply(502, "upstream sent a malformed response", "protocol_error", UPE)
UPSTREAM_REFUSED_STREAM = LocalReply(503, "upstream refused the stream before processing it", "refused_stream", UR)
"""HTTP/2: the server reset the stream REFUSED_STREAM, or its GOAWAY left the stream unread (RFC 9113 8.7): safe to
retry (retryOn refused-stream)."""


def failure(exc: BaseException) -> LocalReply:
    """What a failed `open_connection` is answered and recorded as: 503 UF, whichever way it failed."""
    if isinstance(exc, ConnectionRefusedError):
        return LocalReply(503, "upstream connect error: connection refused", "refused", UF)
    if isinstance(exc, ssl.SSLError):  # mTLS: the peer's certificate, or ours, did not do
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
        return LocalReply(503, f"upstream connect error: TLS handshake failed ({reason})", "tls_handshake", UF)
    if isinstance(exc, TimeoutError):  # asyncio.timeout's, and the kernel's ETIMEDOUT
        return LocalReply(503, "upstream connect error: timed out", "timeout", UF)
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # unreachable, no route, ...
    return LocalReply(503, f"upstream connect error: {text}", "refused", UF)


def no_endpoint(service: str) -> LocalReply:
    """A mesh service with no instance to send to: 503 UH."""
    return LocalReply(503, f"service {service} has no instances", "no_healthy_upstream", UH)


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_connection(protocol: Callable[[], P], addr: tuple[str, int], timeout: float | None = None,
                          tls: ssl.SSLContext | None = None) -> P:
    """Connect to `addr` within `timeout` (a DestinationRule's connectTimeout; default CONNECT_TIMEOUT), over
    `tls` when given (mTLS: the handshake within the same timeout, resuming the last session to `addr` when there
    is one, proxy/mtls.py; the peer's identity is the caller's to check); the protocol is returned connected.

    Raises OSError (TimeoutError and ssl.SSLError included): `failure` says what it is answered and recorded as."""
    loop = asyncio.get_running_loop()
    # asyncio.timeout, not wait_for: wait_for wraps the connect in a task of its own (Python 3.11), a cost
    # each connection pays (maxRequestsPerConnection makes that every few requests)
    async with asyncio.timeout(timeout or CONNECT_TIMEOUT):
        if tls is None:
            _, proto = await loop.create_connection(protocol, addr[0], addr[1])
            return proto
        # TLS over memory BIOs (TlsClient), not create_connection(ssl=): only wrap_bio takes a session to resume
        proto = protocol()
        raw, client = await loop.create_connection(lambda: TlsClient(tls, addr, SESSIONS, proto), addr[0], addr[1])
        try:
            await client.handshake
        except BaseException:  # failed, lost or timed out: the connection goes
            raw.abort()
            raise
    return proto

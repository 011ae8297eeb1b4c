"""Mutual TLS between sidecars: terminated inbound over a connection already read from, originated outbound.

Inbound, a connection's first bytes are read before anyone knows what it carries (the
sniff, as Envoy's TLS inspector peeks); a ClientHello offering the mesh's ALPN
(`MESH_ALPN`, Istio's `istio-http/1.1` and `istio`) is then terminated here, over the
transport that read it: `TlsServer` becomes that transport's protocol, feeds it (the
hello included) through an `ssl.SSLObject` over memory BIOs, and hands the plaintext to
the connection's shell through `AppTransport`, a transport whose writes it encrypts. The
client's certificate is required and checked against the trust bundle; the verified
SPIFFE id is the call's `peer_identity`. A handshake that fails is recorded with the
reason (a wrong CA, no certificate, expired, not yet valid) and the connection closed.

Outbound, a request to an instance whose sidecar accepts mTLS (labelled
`security.istio.io/tlsMode: istio`, as Istio's injector labels its pods: Istio's auto
mTLS) goes over TLS with the sidecar's own certificate and the mesh ALPN, and the
server's SPIFFE id must be the destination service's (`expected_identity`), else the
connection is refused as a failure to connect (503 UF) naming both.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

__all__ = ["MESH_ALPN", "TLS_MODE_LABEL", "AppTransport", "TlsServer", "meshed", "spiffe_of"]

MESH_ALPN = ("istio-http/1.1", "istio")
# Istio's label on an endpoint whose sidecar terminates mTLS (injected pods carry it).
TLS_MODE_LABEL = ("security.istio.io/tlsMode", "istio")
_READ = 256 * 1024


def meshed(labels: dict[str, str]) -> bool:
    """Whether an instance's sidecar accepts mTLS (Istio's auto mTLS reads the same label)."""
    return labels.get(TLS_MODE_LABEL[0]) == TLS_MODE_LABEL[1]


def spiffe_of(cert: dict[str, Any] | None) -> str:
    """The SPIFFE id among a verified peer certificate's URI SANs (ssl's getpeercert() form), else ''."""
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            return str(value)
    return ""


def handshake_reason(e: ssl.SSLError) -> str:
    """One line for a failed handshake: what OpenSSL said, without its bookkeeping."""
    reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
    return str(reason).replace("_", " ").lower()[:200]


class TlsServer(asyncio.Protocol):
    """Server-side TLS over a raw transport that has already read `first` (the ClientHello's bytes)."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, app: asyncio.Protocol,
                 done: Callable[[TlsServer, str], None]) -> None:
        """`done(tls, error)` once the handshake ends: error '' and `peer_identity` set, or why it failed."""
        self.raw = raw
        self.app = app
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshaken = False
        self.failed = False
        self.peer_identity = ""
        self.transport = AppTransport(self)
        self._done = done
        self._eof_sent = False

    def start(self, first: bytes) -> None:
        self.raw.set_protocol(self)
        self.data_received(first)

    # -- the raw transport's protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self._in.write(data)
        if not self.handshaken:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as e:
                self.failed = True
                self._flush()  # the alert, so the client learns why
                self.raw.close()
                self._done(self, handshake_reason(e))
                return
            self.handshaken = True
            self.peer_identity = spiffe_of(self.ssl.getpeercert())
            self._flush()
            self._done(self, "")
        chunks = []
        while True:
            try:
                chunk = self.ssl.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the client's end of the stream
                self._flush()
                if chunks:
                    self.app.data_received(b"".join(chunks))
                    chunks = []
                self._peer_eof()
                break
            except ssl.SSLError:
                self.raw.abort()
                return
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()  # session tickets, key updates
        if chunks:
            self.app.data_received(b"".join(chunks))

    def _peer_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        keep = self.app.eof_received()
        if not keep:
            self.transport.close()

    def eof_received(self) -> bool | None:
        if self.handshaken and not self.failed:
            self._peer_eof()
        return True if self._eof_sent and not self.raw.is_closing() else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connection_lost(exc)  # handshaken or not: the shell forgets the connection

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.write(data)


class AppTransport(asyncio.Transport):
    """The plaintext side of a terminated TLS connection, as the shells and tunnels use a transport."""

    def __init__(self, tls: TlsServer) -> None:
        super().__init__()
        self._tls = tls
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._tls.raw.is_closing():
            return
        try:
            self._tls.ssl.write(data)
        except ssl.SSLError:
            self._tls.raw.abort()
            return
        self._tls._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._tls.ssl.unwrap()  # close_notify
        except (ssl.SSLError, ValueError):
            pass
        self._tls._flush()
        self._tls.raw.close()

    def abort(self) -> None:
        self._closing = True
        self._tls.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tls.raw.is_closing()

    def pause_reading(self) -> None:
        self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.raw.is_reading()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peercert":
            return self._tls.ssl.getpeercert()
        if name == "ssl_object":
            return self._tls.ssl
        if name == "peer_identity":
            return self._tls.peer_identity
        return self._tls.raw.get_extra_info(name, default)

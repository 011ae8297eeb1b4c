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
connection is refused as a failure to connect (503 UF) naming both. It is originated the
way it is terminated, over memory BIOs (`TlsClient`: asyncio's create_connection(ssl=)
cannot offer a session), so that a new connection to an address resumes the last session
to it (`SessionCache`): no certificates are exchanged on resumption, and the identity
checked is the session's, verified when it was made.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_SESSIONS", "MESH_ALPN", "SESSIONS", "TLS_MODE_LABEL", "AppTransport", "SessionCache", "TlsClient",
           "TlsServer", "meshed", "spiffe_of"]

MESH_ALPN = ("istio-http/1.1", "istio")
# Istio's label on an endpoint whose sidecar terminates mTLS (injected pods carry it).
TLS_MODE_LABEL = ("security.istio.io/tlsMode", "istio")
_READ = 256 * 1024
# Upstream addresses whose last TLS session a client context keeps, to resume the next connection's handshake with
# it (Envoy keeps max_session_keys = 1 per upstream cluster; 0 keeps none: every handshake a full one).
MAX_SESSIONS = 1024


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


@functools.lru_cache(maxsize=64)
def _seconds(cert_time: str) -> float:
    """ssl.cert_time_to_seconds, remembered: strptime costs ~15 us, and a mesh has few certificates at a time."""
    return ssl.cert_time_to_seconds(cert_time)


class _Tls(asyncio.Protocol):
    """One end of a TLS connection: an SSLObject over memory BIOs as a raw transport's protocol, its plaintext
    handed to `app` through `transport` (an AppTransport). What the two ends share: records in, plaintext out."""

    def __init__(self, raw: asyncio.Transport | None, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, app: asyncio.Protocol) -> None:
        # per connection
        self.raw: asyncio.Transport = raw  # type: ignore[assignment]  # the client's: set by connection_made
        self.app = app
        self._in, self._out = incoming, outgoing
        self.ssl = obj
        self.handshaken = False
        self.failed = False
        self.resumed = False
        """The handshake resumed an earlier session (no certificates exchanged: the session's are the peer's)."""
        self.peer_identity = ""
        self.error: ssl.SSLError | None = None
        """Why the handshake failed."""
        self.transport = AppTransport(self)
        self._eof_sent = False

    def _handshake(self) -> bool:
        """Go on with the handshake on what arrived; whether it is done. A failure sets `failed` and `error`, flushes
        the alert (so the peer learns why) and closes the connection."""
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:
            return self._fail(e)
        cert = self.ssl.getpeercert()
        if self.ssl.session_reused:
            self.resumed = True
            # a session outlives nothing it was made with: the peer's certificate must still be valid now
            if not cert or _seconds(cert["notAfter"]) <= time.time():
                expired = ssl.SSLCertVerificationError(1, "certificate has expired (resumed session)")
                expired.verify_message = "certificate has expired (resumed session)"
                return self._fail(expired)
        self.handshaken = True
        self.peer_identity = spiffe_of(cert)
        self._flush()
        return True

    def _fail(self, e: ssl.SSLError) -> bool:
        self.failed, self.error = True, e
        self._flush()
        self.raw.close()
        return False

    def _deliver(self) -> bool:
        """Decrypt what arrived and hand the plaintext to the app; whether there was any."""
        chunks = []
        obj, incoming = self.ssl, self._in
        while True:
            try:
                chunk = obj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the peer's end of the stream
                self._flush()
                if chunks:
                    self.app.data_received(b"".join(chunks))
                self._peer_eof()
                return bool(chunks)
            except ssl.SSLError as e:  # a record that does not decrypt (a bad MAC, say): the alert, then closed
                return self._fail(e)
            if not chunk:
                break
            chunks.append(chunk)
            if not incoming.pending and not obj.pending():  # all read: spares the SSLWantReadError a read costs
                break
        if self._out.pending:  # session tickets, key updates
            self._flush()
        if chunks:
            self.app.data_received(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            return True
        return False

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


class TlsServer(_Tls):
    """Server-side TLS over a raw transport that has already read `first` (the ClientHello's bytes)."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext, app: asyncio.Protocol,
                 done: Callable[[TlsServer, str], None]) -> None:
        """`done(tls, error)` once the handshake ends: error '' and `peer_identity` set, or why it failed."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        super().__init__(raw, context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing, app)
        self._done = done

    def start(self, first: bytes) -> None:
        self.raw.set_protocol(self)
        self.data_received(first)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self._in.write(data)
        if not self.handshaken:
            if not self._handshake():
                if self.failed:
                    self._done(self, handshake_reason(self.error))  # type: ignore[arg-type]
                return
            self._done(self, "")
        self._deliver()


class SessionCache:
    """The last TLS session of each upstream address, made with the client context in force.

    Python offers a session only to a connection of the context that made it, and the workload's contexts are
    replaced whole at each renewal (proxy/identity.py): the first connection asked for with a new context drops
    the old one's sessions (a session holds its context: keeping them would keep every renewal's context alive),
    and a session a connection of an older context brings back later is not kept."""

    def __init__(self) -> None:
        self.context: ssl.SSLContext | None = None
        self.sessions: dict[tuple[str, int], ssl.SSLSession] = {}

    def __repr__(self) -> str:
        return f"<SessionCache sessions={len(self.sessions)}>"

    def get(self, context: ssl.SSLContext, addr: tuple[str, int]) -> ssl.SSLSession | None:
        """The session to offer a new connection to `addr` made with `context` (the one in force), if any."""
        if context is not self.context:
            self.context, self.sessions = context, {}
            return None
        return self.sessions.get(addr)

    def put(self, context: ssl.SSLContext, addr: tuple[str, int], session: ssl.SSLSession) -> None:
        if context is not self.context or MAX_SESSIONS <= 0:
            return
        sessions = self.sessions
        sessions.pop(addr, None)  # the newest last: the oldest address goes first when full
        if len(sessions) >= MAX_SESSIONS:
            del sessions[next(iter(sessions))]
        sessions[addr] = session


class TlsClient(_Tls):
    """Client-side TLS (mTLS originated) as the protocol of a connection being opened to `addr`: the last session
    to that address is offered, and the one a full handshake gets is kept for the next. `handshake` resolves when
    the handshake is done (the app then connected to `transport`), or fails with the ssl.SSLError or the loss."""

    def __init__(self, context: ssl.SSLContext, addr: tuple[str, int], sessions: SessionCache,
                 app: asyncio.Protocol) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=False, session=sessions.get(context, addr))
        super().__init__(None, obj, incoming, outgoing, app)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._context, self._addr, self._sessions = context, addr, sessions
        self._keep_session = True  # until this connection's session is kept, or there is none to keep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self._handshake()  # the ClientHello

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self._in.write(data)
        if not self.handshaken:
            if not self._handshake():
                if self.failed and not self.handshake.done():
                    self.handshake.set_exception(self.error)  # type: ignore[arg-type]
                return
            # A resumed session is offered again (OpenSSL's tickets are stateless, good until their lifetime or the
            # server's next key), not replaced: Python copies a session through DER each way (its workaround for
            # OpenSSL 1.1.0), ~120 us with OpenSSL 3's certificate decoding, so one copy a full handshake, not two.
            self._keep_session = not self.resumed and MAX_SESSIONS > 0
            self.app.connection_made(self.transport)
            if not self.handshake.done():
                self.handshake.set_result(None)
        if self._deliver() and self._keep_session:
            # TLS 1.3 tickets come after the handshake, but before any answer: read by the first plaintext
            self._keep_session = False
            session = self.ssl.session
            if session is not None and session.has_ticket:
                self._sessions.put(self._context, self._addr, session)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshaken:
            self.app.connection_lost(exc)
        elif not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("the upstream closed during the TLS handshake"))


SESSIONS = SessionCache()
"""The sidecar's sessions (one per process: sessions belong to contexts, which are the process' own)."""


class AppTransport(asyncio.Transport):
    """The plaintext side of a terminated TLS connection, as the shells and tunnels use a transport."""

    def __init__(self, tls: _Tls) -> None:
        super().__init__()
        self._tls = tls
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        tls = self._tls
        if self._closing or tls.raw.is_closing():
            return
        try:
            tls.ssl.write(data)
        except ssl.SSLError:
            tls.raw.abort()
            return
        tls.raw.write(tls._out.read())

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

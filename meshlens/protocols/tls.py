"""Read the first TLS handshake message of each direction: ClientHello (SNI, versions,
ALPN) and ServerHello (chosen version, ALPN). Nothing is decrypted.

Bytes in, at most one hello out. The hello may be split across several records
and across several `feed` calls; buffering is bounded by `MAX_HELLO_BYTES`.
With TLS 1.3 the server's ALPN travels in the encrypted EncryptedExtensions, so
`ServerHello.alpn` is only seen for TLS <= 1.2.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from meshlens.protocols.errors import LocalError, PeerError

__all__ = [
    "MAX_HELLO_BYTES",
    "MAX_RECORD_BYTES",
    "ClientHello",
    "HelloParser",
    "ServerHello",
    "State",
    "hello_attributes",
    "version_name",
]

# Envoy's tls_inspector refuses ClientHellos above 16 KiB by default
# (max_client_hello_size); a post-quantum hybrid key share is ~1.2 KiB of that.
MAX_HELLO_BYTES = 16 * 1024
# RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes.
MAX_RECORD_BYTES = 2**14

_RECORD_HANDSHAKE = 0x16
_RECORD_ALERT = 0x15
_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

_VERSION_NAMES = {0x0300: "SSLv3", 0x0301: "TLSv1.0", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


def version_name(version: int) -> str:
    """`0x0304` -> `TLSv1.3`; GREASE and unknown values as hex."""
    return _VERSION_NAMES.get(version, f"0x{version:04x}")


def _is_grease(value: int) -> bool:
    # RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa are reserved values clients sprinkle in.
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client offers before any encryption."""

    legacy_version: int
    """The `legacy_version` field (0x0303 for TLS 1.2 and 1.3 clients)."""
    versions: tuple[int, ...]
    """supported_versions offered, GREASE removed; `(legacy_version,)` when the extension is absent."""
    sni: str | None
    """The host_name from server_name, or None."""
    alpn: tuple[str, ...]
    """ALPN protocol ids in the client's order (`("h2", "http/1.1")`)."""
    cipher_suites: tuple[int, ...]
    """Offered cipher suites, GREASE removed."""

    @property
    def max_version(self) -> int:
        return max(self.versions)


@dataclass(frozen=True, slots=True)
class ServerHello:
    """What the server chose."""

    legacy_version: int
    """The `legacy_version` field (0x0303 for TLS 1.2 and 1.3 servers)."""
    version: int
    """The negotiated version: supported_versions when present, else legacy_version."""
    cipher_suite: int
    alpn: str | None
    """ALPN chosen, when visible in cleartext (TLS <= 1.2)."""
    hello_retry: bool
    """True for a HelloRetryRequest: another ServerHello follows the client's second hello."""


def hello_attributes(client: ClientHello | None, server: ServerHello | None, error: str = "") -> dict[str, str]:
    """What a call records of a TLS handshake seen in cleartext (tap and sidecar name them alike).

    The SNI goes to the call's authority, not here."""
    attrs: dict[str, str] = {}
    if client is not None:
        attrs["tls_client_versions"] = ",".join(version_name(v) for v in client.versions)
        if client.alpn:
            attrs["tls_client_alpn"] = ",".join(client.alpn)
    if server is not None:
        attrs["tls_version"] = version_name(server.version)
        if server.alpn:
            attrs["tls_alpn"] = server.alpn
    if error:
        attrs["tls_parse_error"] = error
    return attrs


class State(enum.Enum):
    """Where a HelloParser is."""

    READING = "reading"
    DONE = "done"
    FAILED = "failed"


# Rules: feed() is accepted only in READING; a complete hello moves to DONE, garbage to
# FAILED (the error is raised once, later feeds raise LocalError naming the state).
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.READING: frozenset({State.READING, State.DONE, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}


class _Reader:
    """Bounds-checked big-endian reads; running off the end is the peer's fault."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise PeerError(f"TLS {self._what} truncated at byte {self._pos} (wanted {n} more)")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def take_all(self) -> bytes:
        return self.take(len(self._data) - self._pos)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, len_bytes: int) -> _Reader:
        return _Reader(self.take(int.from_bytes(self.take(len_bytes), "big")), self._what)

    def done(self) -> bool:
        return self._pos >= len(self._data)


class HelloParser:
    """One direction of a TLS connection, until its hello: `client` side or `server` side.

    Feed bytes until a hello comes back (DONE) or a PeerError is raised (FAILED); after
    that the rest of the connection is the caller's to count, not this parser's to read."""

    def __init__(self, side: Literal["client", "server"]) -> None:
        if side not in ("client", "server"):
            raise LocalError(f"side must be 'client' or 'server', not {side!r}")
        self.side = side
        self.state = State.READING
        self._records = bytearray()  # unparsed record bytes, < one record
        self._handshake = bytearray()  # handshake-layer bytes gathered from records

    def __repr__(self) -> str:
        return f"<HelloParser side={self.side} state={self.state.name} buffered={self.buffered}>"

    @property
    def buffered(self) -> int:
        """Bytes held right now; never above MAX_RECORD_BYTES + 5 + MAX_HELLO_BYTES + 4."""
        return len(self._records) + len(self._handshake)

    def _move(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise LocalError(f"HelloParser: no transition {self.state.name} -> {new.name}")
        self.state = new

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | ServerHello | None:
        """Take the next bytes of this direction; return the hello once it is complete."""
        if self.state is not State.READING:
            raise LocalError(f"HelloParser.feed() in state {self.state.name}")
        try:
            hello = self._feed(data)
        except PeerError:
            self._records.clear()
            self._handshake.clear()
            self._move(State.FAILED)
            raise
        if hello is not None:
            self._records.clear()
            self._handshake.clear()
            self._move(State.DONE)
        return hello

    def _feed(self, data: bytes | bytearray | memoryview) -> ClientHello | ServerHello | None:
        self._records += data
        while len(self._records) >= 5:
            rtype, major = self._records[0], self._records[1]
            length = int.from_bytes(self._records[3:5], "big")
            if rtype == _RECORD_ALERT:
                raise PeerError(f"TLS alert from the {self.side} before its hello")
            if rtype != _RECORD_HANDSHAKE or major != 0x03:
                raise PeerError(f"not a TLS handshake record (type 0x{rtype:02x}, version major 0x{major:02x})")
            if length == 0 or length > MAX_RECORD_BYTES:
                raise PeerError(f"TLS record length {length} out of range 1..{MAX_RECORD_BYTES}")
            if len(self._records) < 5 + length:
                break
            self._handshake += self._records[5:5 + length]
            del self._records[:5 + length]
            hello = self._try_hello()
            if hello is not None:
                return hello
        return None

    def _try_hello(self) -> ClientHello | ServerHello | None:
        if len(self._handshake) < 4:
            return None
        expected = _HS_CLIENT_HELLO if self.side == "client" else _HS_SERVER_HELLO
        if self._handshake[0] != expected:
            raise PeerError(f"first TLS handshake message from the {self.side} has type {self._handshake[0]}, expected {expected}")
        length = int.from_bytes(self._handshake[1:4], "big")
        if length > MAX_HELLO_BYTES:
            raise PeerError(f"TLS hello of {length} bytes exceeds MAX_HELLO_BYTES={MAX_HELLO_BYTES}", status=431)
        if len(self._handshake) < 4 + length:
            return None
        body = bytes(self._handshake[4:4 + length])
        if self.side == "client":
            return _parse_client_hello(_Reader(body, "ClientHello"))
        return _parse_server_hello(_Reader(body, "ServerHello"))


def _extensions(r: _Reader) -> dict[int, _Reader]:
    found: dict[int, _Reader] = {}
    if r.done():  # extensions are optional before TLS 1.2
        return found
    exts = r.vec(2)
    while not exts.done():
        ext_type = exts.u16()
        found[ext_type] = exts.vec(2)
    return found


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    names = ext.vec(2)
    out = []
    while not names.done():
        out.append(names.vec(1).take_all().decode("ascii", "backslashreplace"))
    return tuple(out)


def _parse_client_hello(r: _Reader) -> ClientHello:
    legacy_version = r.u16()
    r.take(32)  # random
    r.vec(1)  # legacy_session_id
    suites_r = r.vec(2)
    suites = []
    while not suites_r.done():
        suite = suites_r.u16()
        if not _is_grease(suite):
            suites.append(suite)
    r.vec(1)  # legacy_compression_methods
    exts = _extensions(r)
    sni: str | None = None
    if _EXT_SERVER_NAME in exts:
        names = exts[_EXT_SERVER_NAME].vec(2)
        while not names.done():
            name_type = names.u8()
            name = names.vec(2).take_all()
            if name_type == 0 and sni is None:
                try:
                    sni = name.decode("ascii")
                except UnicodeDecodeError:
                    raise PeerError("TLS server_name is not ASCII") from None
    alpn = _parse_alpn(exts[_EXT_ALPN]) if _EXT_ALPN in exts else ()
    versions: tuple[int, ...] = (legacy_version,)
    if _EXT_SUPPORTED_VERSIONS in exts:
        listed = exts[_EXT_SUPPORTED_VERSIONS].vec(1)
        offered = []
        while not listed.done():
            v = listed.u16()
            if not _is_grease(v):
                offered.append(v)
        if offered:
            versions = tuple(offered)
    return ClientHello(legacy_version, versions, sni, alpn, tuple(suites))


def _parse_server_hello(r: _Reader) -> ServerHello:
    legacy_version = r.u16()
    random = r.take(32)
    r.vec(1)  # legacy_session_id_echo
    cipher_suite = r.u16()
    r.u8()  # legacy_compression_method
    exts = _extensions(r)
    version = legacy_version
    if _EXT_SUPPORTED_VERSIONS in exts:
        version = exts[_EXT_SUPPORTED_VERSIONS].u16()
    alpn: str | None = None
    if _EXT_ALPN in exts:
        chosen = _parse_alpn(exts[_EXT_ALPN])
        if len(chosen) != 1:
            raise PeerError(f"ServerHello ALPN must name exactly one protocol, got {len(chosen)}")
        alpn = chosen[0]
    return ServerHello(legacy_version, version, cipher_suite, alpn, random == _HRR_RANDOM)

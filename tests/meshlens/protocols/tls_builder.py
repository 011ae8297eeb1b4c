"""Build TLS hello records by hand, field by field (RFC 8446 4.1.2 / 4.1.3)."""
from __future__ import annotations


def vec(length_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_bytes, "big") + body


def ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec(2, body)


def sni_ext(host: str) -> bytes:
    return ext(0, vec(2, b"\x00" + vec(2, host.encode())))


def alpn_ext(*protocols: str) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, p.encode()) for p in protocols)))


def client_versions_ext(*versions: int) -> bytes:
    return ext(43, vec(1, b"".join(v.to_bytes(2, "big") for v in versions)))


def client_hello(extensions: bytes, legacy_version: int = 0x0303, suites: tuple[int, ...] = (0x1301, 0x1302)) -> bytes:
    body = (
        legacy_version.to_bytes(2, "big")
        + b"\x11" * 32
        + vec(1, b"\x22" * 32)
        + vec(2, b"".join(s.to_bytes(2, "big") for s in suites))
        + vec(1, b"\x00")
        + vec(2, extensions)
    )
    return b"\x01" + vec(3, body)


def server_hello(extensions: bytes, legacy_version: int = 0x0303, suite: int = 0x1301, random: bytes = b"\x33" * 32) -> bytes:
    body = legacy_version.to_bytes(2, "big") + random + vec(1, b"") + suite.to_bytes(2, "big") + b"\x00" + vec(2, extensions)
    return b"\x02" + vec(3, body)


def records(handshake: bytes, *, split_at: tuple[int, ...] = (), version: int = 0x0301) -> bytes:
    """Wrap handshake bytes in handshake records, cutting the fragment at `split_at`."""
    cuts = [0, *split_at, len(handshake)]
    return b"".join(
        b"\x16" + version.to_bytes(2, "big") + vec(2, handshake[a:b]) for a, b in zip(cuts, cuts[1:])
    )

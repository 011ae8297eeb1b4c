"""Classify a connection by its first bytes: TLS, the HTTP/2 preface, HTTP/1.x or plain TCP.

A pure function over bytes; the caller keeps reading while the answer is
`need_more` (at most `SNIFF_MAX_BYTES` are ever needed).
"""
from __future__ import annotations

from typing import Literal

__all__ = [
    "H2_PREFACE",
    "HTTP1_METHODS",
    "SNIFF_MAX_BYTES",
    "Protocol",
    "sniff",
]

Protocol = Literal["tls", "h2", "http/1.1", "tcp", "need_more"]

# RFC 9113 section 3.4: every cleartext HTTP/2 connection starts with these 24 bytes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 methods, PATCH (RFC 5789) and the WebDAV ones llhttp also knows; a method
# outside this list is sniffed as TCP (the proxy then tunnels it, nothing is lost).
HTTP1_METHODS: tuple[bytes, ...] = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
    b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK",
    b"UNLOCK", b"REPORT", b"SEARCH", b"PURGE",
)
_METHOD_PREFIXES: tuple[bytes, ...] = tuple(m + b" " for m in HTTP1_METHODS)

# The longest prefix that can still be undecided: the whole HTTP/2 preface.
SNIFF_MAX_BYTES = len(H2_PREFACE)

_TLS_HANDSHAKE = 0x16


def sniff(data: bytes | bytearray | memoryview) -> Protocol:
    """Return the protocol `data` (the first bytes of a connection) starts, or `need_more`."""
    head = bytes(data[:SNIFF_MAX_BYTES])
    if not head:
        return "need_more"
    if head[0] == _TLS_HANDSHAKE:
        # TLS record header: type 0x16 (handshake), then version 0x03xx (SSL 3.0 .. TLS 1.3).
        if len(head) < 2:
            return "need_more"
        return "tls" if head[1] == 0x03 else "tcp"
    if head.startswith(H2_PREFACE):
        return "h2"
    undecided = H2_PREFACE.startswith(head)
    for prefix in _METHOD_PREFIXES:
        if head.startswith(prefix):
            return "http/1.1"
        if prefix.startswith(head):
            undecided = True
    return "need_more" if undecided else "tcp"

"""sniff(): first bytes in, protocol class out."""
from __future__ import annotations

import pytest

from meshlens.protocols.sniff import H2_PREFACE, SNIFF_MAX_BYTES, sniff


@pytest.mark.parametrize(
    ("first_bytes", "expected"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "tls"),
        (b"\x16\x03\x03", "tls"),
        (H2_PREFACE + b"\x00\x00\x12\x04", "h2"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http/1.1"),
        (b"POST /upload HTTP/1.1\r\n", "http/1.1"),
        (b"CONNECT db:5432 HTTP/1.1\r\n", "http/1.1"),
        (b"OPTIONS * HTTP/1.1\r\n", "http/1.1"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "tcp"),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "tcp"),  # PostgreSQL SSLRequest
        (b"\x16\x01\x00", "tcp"),  # handshake type byte, but not TLS's 0x03xx version
        (b"get / HTTP/1.1\r\n", "tcp"),  # methods are case-sensitive
        (b"GETX / HTTP/1.1\r\n", "tcp"),
        (b"PRI * HTTP/1.1\r\n", "tcp"),  # the preface's start, then not the preface
    ],
)
def test_classifies(first_bytes: bytes, expected: str) -> None:
    assert sniff(first_bytes) == expected


@pytest.mark.parametrize("prefix", [b"", b"\x16", b"G", b"GE", b"GET", b"P", b"PRI", b"PRI * HTTP/2.0\r\n\r\nSM\r\n", b"OPTIONS"])
def test_need_more_while_undecided(prefix: bytes) -> None:
    assert sniff(prefix) == "need_more"


def test_every_prefix_of_a_class_is_need_more_or_that_class() -> None:
    for whole, cls in [(H2_PREFACE, "h2"), (b"DELETE /x HTTP/1.1", "http/1.1"), (b"\x16\x03\x03\x00", "tls")]:
        for n in range(len(whole) + 1):
            assert sniff(whole[:n]) in ("need_more", cls), (whole[:n], cls)
        assert sniff(whole) == cls


def test_never_needs_more_than_sniff_max_bytes() -> None:
    assert SNIFF_MAX_BYTES == 24
    assert sniff(H2_PREFACE[:SNIFF_MAX_BYTES]) == "h2"
    assert sniff(memoryview(b"GET /" + b"x" * 100)) == "http/1.1"

"""HelloParser: TLS records in (any split), one ClientHello / ServerHello out."""
from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from meshlens.protocols.errors import LocalError, PeerError
from meshlens.protocols.tls import (MAX_HELLO_BYTES, ClientHello, HelloParser, ServerHello, State, hello_attributes,
                                    version_name)
from tests.meshlens.protocols.tls_builder import (
    alpn_ext,
    client_hello,
    client_versions_ext,
    ext,
    records,
    server_hello,
    sni_ext,
)

GREASE = 0x3A3A


def feed_all(parser: HelloParser, chunks: list[bytes]) -> ClientHello | ServerHello | None:
    result = None
    for chunk in chunks:
        got = parser.feed(chunk)
        if got is not None:
            assert result is None and parser.state is State.DONE
            result = got
    return result


def hand_built_client_hello() -> bytes:
    hs = client_hello(
        sni_ext("orders.shop.svc.cluster.local")
        + alpn_ext("h2", "http/1.1")
        + client_versions_ext(GREASE, 0x0304, 0x0303),
        suites=(GREASE, 0x1301, 0xC02F),
    )
    return records(hs, split_at=(40,))  # two records, cut inside the cipher suites


def test_client_hello_split_across_two_records_fed_one_byte_at_a_time() -> None:
    data = hand_built_client_hello()
    assert data.count(b"\x16\x03\x01") >= 2
    hello = feed_all(HelloParser("client"), [data[i:i + 1] for i in range(len(data))])
    assert hello == ClientHello(
        legacy_version=0x0303,
        versions=(0x0304, 0x0303),
        sni="orders.shop.svc.cluster.local",
        alpn=("h2", "http/1.1"),
        cipher_suites=(0x1301, 0xC02F),
    )
    assert hello.max_version == 0x0304 and version_name(hello.max_version) == "TLSv1.3"


def test_client_hello_without_extensions_is_legacy() -> None:
    body = b"\x03\x01" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    hello = HelloParser("client").feed(records(b"\x01" + len(body).to_bytes(3, "big") + body))
    assert hello == ClientHello(0x0301, (0x0301,), None, (), (0x002F,))
    assert version_name(0x0301) == "TLSv1.0"


def test_real_client_hello_from_python_ssl() -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    outgoing = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="payments.internal")
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    data = outgoing.read()
    parser = HelloParser("client")
    hello = feed_all(parser, [data[:3], data[3:100], data[100:]])
    assert isinstance(hello, ClientHello)
    assert hello.sni == "payments.internal"
    assert hello.alpn == ("h2", "http/1.1")
    assert 0x0304 in hello.versions and hello.legacy_version == 0x0303
    assert parser.buffered == 0 and "DONE" in repr(parser)


def test_server_hello_tls12_with_alpn_and_tls13_with_supported_versions() -> None:
    tls12 = HelloParser("server").feed(records(server_hello(alpn_ext("h2"), suite=0xC02F), version=0x0303))
    assert tls12 == ServerHello(0x0303, 0x0303, 0xC02F, "h2", False)
    tls13 = HelloParser("server").feed(records(server_hello(ext(43, b"\x03\x04")), version=0x0303))
    assert tls13 == ServerHello(0x0303, 0x0304, 0x1301, None, False)


def test_hello_retry_request_is_flagged() -> None:
    hrr_random = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
    hello = HelloParser("server").feed(records(server_hello(ext(43, b"\x03\x04"), random=hrr_random)))
    assert isinstance(hello, ServerHello) and hello.hello_retry


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found: cannot make a certificate for a real ServerHello")
    d = tmp_path_factory.mktemp("cert")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize(("max_version", "version", "alpn"), [
    (ssl.TLSVersion.TLSv1_3, 0x0304, None),  # TLS 1.3 sends ALPN encrypted
    (ssl.TLSVersion.TLSv1_2, 0x0303, "http/1.1"),
])
def test_real_server_hello_from_python_ssl(server_cert: tuple[Path, Path], max_version: ssl.TLSVersion, version: int, alpn: str | None) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*server_cert)
    server_ctx.maximum_version = max_version
    server_ctx.set_alpn_protocols(["http/1.1"])
    c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(ssl.MemoryBIO(), c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    client_flight = c_out.read()
    s_in.write(client_flight)
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    server_flight = s_out.read()
    assert HelloParser("client").feed(client_flight).sni == "localhost"  # type: ignore[union-attr]
    hello = HelloParser("server").feed(server_flight)  # the rest of the flight is left unread
    assert isinstance(hello, ServerHello)
    assert (hello.version, hello.alpn, hello.hello_retry) == (version, alpn, False)


@pytest.mark.parametrize(("data", "message"), [
    (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
    (b"\x15\x03\x03\x00\x02\x02\x28", "alert"),
    (b"\x16\x03\x03\x00\x00", "record length 0"),
    (records(b"\x02\x00\x00\x00"), "expected 1"),
    (records(b"\x01\x00\x00\x05\x03\x03\x00\x00\x00"), "truncated"),
    (records(client_hello(b"\x00\x00\x00\x09\x00\x07\x00\x00\x04\xff\xfe\xfd\xfc")), "not ASCII"),
])
def test_garbage_is_a_peer_error_and_fails_the_parser(data: bytes, message: str) -> None:
    parser = HelloParser("client")
    with pytest.raises(PeerError, match=message) as info:
        parser.feed(data)
    assert info.value.status == 400
    assert parser.state is State.FAILED and parser.buffered == 0
    with pytest.raises(LocalError, match="FAILED"):
        parser.feed(b"\x16")


def test_oversized_hello_is_refused_before_it_is_buffered() -> None:
    parser = HelloParser("client")
    header = b"\x01" + (MAX_HELLO_BYTES + 1).to_bytes(3, "big")
    with pytest.raises(PeerError, match="MAX_HELLO_BYTES") as info:
        parser.feed(records(header + b"\x00" * 100))
    assert info.value.status == 431


def test_feeding_after_done_is_our_bug() -> None:
    parser = HelloParser("client")
    assert parser.feed(hand_built_client_hello()) is not None
    with pytest.raises(LocalError, match="DONE"):
        parser.feed(b"\x17\x03\x03")


def test_hello_attributes_name_what_both_hellos_showed():
    client = ClientHello(0x0303, (0x0304, 0x0303), "shop.example", ("h2", "http/1.1"), (0x1301,))
    server = ServerHello(0x0303, 0x0303, 0xC02F, "h2", False)
    assert hello_attributes(client, server) == {
        "tls_client_versions": "TLSv1.3,TLSv1.2", "tls_client_alpn": "h2,http/1.1",
        "tls_version": "TLSv1.2", "tls_alpn": "h2"}
    assert hello_attributes(None, None, "record too large") == {"tls_parse_error": "record too large"}

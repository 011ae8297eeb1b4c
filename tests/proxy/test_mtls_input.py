"""Bad input on a real sidecar's mTLS path: fuzzed first bytes, records cut or corrupted after a real handshake,
an absurd client certificate chain. Each is refused (or passed through, as other TLS is), recorded and counted;
no connection is left open; and the mesh's mTLS calls and plaintext are served all along."""
from __future__ import annotations

import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from meshlens.proxy.mtls import MESH_ALPN
from tests.proxy.processes import rss_kb
from tests.proxy.test_mtls import WEB, client_cert, collector, mesh_world, rows, world  # noqa: F401 (fixtures)
from tests.proxy.test_policies import request, stats
from tests.waiting import wait_until

# A socket operation on a fuzzed connection that takes this long means the sidecar hangs it: failed, not waited on.
SOCKET_TIMEOUT_S = 30.0


def still_serving(web, api) -> None:
    """An mTLS call through the web sidecar and a plaintext call to the api sidecar both answered."""
    assert request(web.outbound, "api", "/mesh-ok")[:2] == (200, "api")
    assert request(api.inbound, "api", "/plain-ok")[:2] == (200, "api")


def settled(web, api) -> None:
    """No connection left open on the api sidecar but the web sidecar's own to it (those it pools)."""
    import subprocess

    def web_sockets() -> int:
        out = subprocess.run(["ss", "-Htnp", "state", "established", "dport", "=", f":{api.inbound}"],
                             capture_output=True, text=True, timeout=30).stdout
        return sum(f"pid={web.proc.pid}," in line for line in out.splitlines())

    wait_until(lambda: stats(api)["downstream_cx_active"] <= web_sockets(),
               "the api sidecar's connections back to the web sidecar's own", poll=0.1)


def trust_bundle(control) -> str:
    with urllib.request.urlopen(control.url + "/v1/trust-bundle", timeout=30) as resp:
        return resp.read().decode()


def mesh_context(control, cert: Path, key: Path) -> ssl.SSLContext:
    """A client as a sidecar is one: a certificate from the mesh's CA, the mesh ALPN, the server checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=trust_bundle(control))
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(list(MESH_ALPN))
    return ctx


def poke(port: int, data: bytes) -> bytes:
    """`data` on a new connection, half-closed; whatever comes back until the sidecar closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            return b""
        return until_closed(s)


def until_closed(s: socket.socket) -> bytes:
    """What the sidecar sends until it closes (or resets); a sidecar that never closes fails the test."""
    out = bytearray()
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        except socket.timeout:
            raise AssertionError(f"the sidecar kept the connection open {SOCKET_TIMEOUT_S:g} s") from None
        if not chunk:
            return bytes(out)
        out += chunk


class MeshClient:
    """A TLS client over a real socket through memory BIOs, so a test holds the very records it sends."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed during the handshake")
                self.incoming.write(data)
        self.sock.sendall(self.outgoing.read())

    def records(self, plaintext: bytes) -> bytes:
        """The TLS records carrying `plaintext`, not sent."""
        self.tls.write(plaintext)
        return self.outgoing.read()

    def close(self) -> None:
        self.sock.close()


def client_hellos() -> list[bytes]:
    """Real ClientHellos from Python's ssl (OpenSSL): TLS 1.3 and 1.2 offering the mesh ALPN, and one offering none."""
    out = []
    for alpn, top in ((MESH_ALPN, ssl.TLSVersion.TLSv1_3), (MESH_ALPN, ssl.TLSVersion.TLSv1_2), ((), None)):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if top is not None:
            ctx.maximum_version = top
        outgoing = ssl.MemoryBIO()
        tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="api")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        out.append(outgoing.read())
    return out


HELLOS = client_hellos()


@st.composite
def mutated_hello(draw: st.DrawFn) -> bytes:
    """A real ClientHello with bytes flipped, cut short, or followed by more."""
    hello = bytearray(draw(st.sampled_from(HELLOS)))
    for _ in range(draw(st.integers(0, 4))):
        hello[draw(st.integers(0, len(hello) - 1))] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["whole", "cut", "more"]))
    if how == "cut":
        return bytes(hello[:draw(st.integers(1, len(hello) - 1))])
    return bytes(hello) + (draw(st.binary(min_size=1, max_size=200)) if how == "more" else b"")


record_header = st.builds(lambda kind, version, length, rest: bytes([kind]) + version + length.to_bytes(2, "big") + rest,
                          st.sampled_from([0x16, 0x15, 0x17, 0x14]),
                          st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00", b"\x03\x04", b"\x00\x00"]),
                          st.integers(0, 0xFFFF), st.binary(max_size=300))
first_bytes = st.one_of(st.binary(max_size=80), record_header, mutated_hello())


def test_fuzzed_first_bytes_are_refused_or_passed_and_the_sidecar_keeps_serving(world, collector):
    """Random bytes, records of every type with random lengths, real hellos mutated and cut: each connection ends
    (nothing hangs it), mTLS and plaintext are served after each, no connection is left open, and every refused
    handshake is both recorded and counted."""
    control, api, web, app, tmp_path = world
    still_serving(web, api)

    @settings(max_examples=60, deadline=None, database=None)
    @given(data=first_bytes)
    def one(data: bytes) -> None:
        poke(api.inbound, data)
        assert api.alive()
        still_serving(web, api)

    one()
    for data in [*HELLOS, *(h[:n] for h in HELLOS for n in (5, 40, len(h) - 1))]:  # whatever the draw missed
        poke(api.inbound, data)
    bad = bytearray(HELLOS[0])
    bad[9:11] = b"\x02\x00"  # legacy_version SSLv2: a mesh hello OpenSSL refuses
    poke(api.inbound, bytes(bad))
    still_serving(web, api)
    settled(web, api)
    counted = stats(api)
    failed = counted["downstream_cx_tls_refused"] + counted["downstream_cx_tls_unfinished"]
    assert counted["downstream_cx_tls_refused"] >= 1 and counted["downstream_cx_tls_unfinished"] >= 1
    assert len(rows(collector, api, failed, "error = 'tls_handshake'")) == failed
    log = api.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_client_silent_after_its_hello_is_closed_at_the_header_timeout_recorded_and_counted(tmp_path, collector):
    with mesh_world(tmp_path, collector, "--header-timeout", "2") as (control, api, web, app, _):
        with socket.create_connection(("127.0.0.1", api.inbound), timeout=SOCKET_TIMEOUT_S) as s:
            s.sendall(HELLOS[0])  # a mesh hello, then nothing: the sidecar answers it and waits for the rest
            until_closed(s)  # within header_timeout (2 s here), well inside the socket's timeout
        [row] = rows(collector, api, 1, "error = 'tls_handshake'")
        assert row["attributes"]["tls_error"] == "no handshake within header_timeout=2s", row
        assert stats(api)["downstream_cx_tls_unfinished"] == 1 and stats(api)["downstream_cx_tls_refused"] == 0
        still_serving(web, api)
        settled(web, api)


def test_a_record_cut_midway_after_the_handshake_is_recorded_and_the_sidecar_keeps_serving(world, collector):
    """An mTLS client sends a request head and part of its body, then half of the next record, and half-closes: the
    request can never end, so it is cut (the app's end too) and recorded downstream_closed with the client's
    verified identity; before, the connection and the app's request stayed open for as long as the client did."""
    control, api, web, app, tmp_path = world
    client = MeshClient(mesh_context(control, *client_cert(tmp_path, control.workdir / "ca", WEB)), api.inbound)
    client.handshake()
    client.sock.sendall(client.records(b"POST /cut HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\nabc"))
    more = client.records(b"x" * 50)
    client.sock.sendall(more[:len(more) // 2])
    client.sock.shutdown(socket.SHUT_WR)
    assert b"HTTP/1.1" not in until_closed(client.sock)  # TLS 1.3 session tickets come first; no answer
    client.close()
    [row] = rows(collector, api, 1, "path = '/cut'")
    assert (row["error"], row["tls"], row["peer_identity"]) == ("downstream_closed", True, WEB), row
    assert app.arrived["/cut"] == 0  # the app never had the whole body
    still_serving(web, api)
    settled(web, api)


def test_a_record_with_a_corrupted_mac_is_refused_recorded_and_counted(world, collector):
    control, api, web, app, tmp_path = world
    client = MeshClient(mesh_context(control, *client_cert(tmp_path, control.workdir / "ca", WEB)), api.inbound)
    client.handshake()
    records = bytearray(client.records(b"GET /mac HTTP/1.1\r\nHost: api\r\n\r\n"))
    records[-3] ^= 0x01  # in the AEAD tag: the record no longer authenticates
    client.sock.sendall(records)
    assert b"HTTP/1.1" not in until_closed(client.sock)
    client.close()
    assert app.arrived["/mac"] == 0
    still_serving(web, api)
    settled(web, api)
    assert stats(api)["downstream_cx_tls_record_error"] == 1
    [row] = rows(collector, api, 1, "error = 'tls_record'")
    assert "bad record mac" in row["attributes"]["tls_error"] and row["peer_identity"] == WEB, row


def filler_certificates(count: int, size: int) -> str:
    """`count` self-signed certificates, each carrying an opaque extension of `size` bytes (PEM)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for i in range(count):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"filler {i}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(hours=1))
                .add_extension(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x00" * size),
                               critical=False)
                .sign(key, hashes.SHA256()))
        out.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    return "".join(out)


def test_an_oversized_client_certificate_chain_is_refused_with_the_reason_and_memory_stays_bounded(world, collector):
    """Python's ssl has no setter for OpenSSL's max_cert_list, whose default (SSL_MAX_CERT_LIST_DEFAULT, 100 KiB)
    bounds the client's Certificate message: OpenSSL refuses a longer one from its 4-byte header, before buffering
    it, and TlsServer reads nothing more of a failed connection. That default is Envoy's and nginx's too (neither
    changes it): no mesh chain (a leaf and an intermediate or two, ~1-4 KiB) comes near it. An 80 KiB chain is
    served; 160 KiB of 40 certificates, or one of 1 MiB, refused with the reason, and the sidecar's memory stays
    where it was."""
    control, api, web, app, tmp_path = world
    ca_dir = control.workdir / "ca"

    def context(count: int, size: int) -> ssl.SSLContext:
        cert, key = client_cert(tmp_path, ca_dir, WEB)
        cert.write_text(cert.read_text() + filler_certificates(count, size))  # the mesh leaf, then the filler
        return mesh_context(control, cert, key)

    def attempt(ctx: ssl.SSLContext, path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", api.inbound), timeout=SOCKET_TIMEOUT_S) as raw:
            try:
                with ctx.wrap_socket(raw) as s:  # TLS 1.3: the client is done before the server reads its chain
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n".encode())
                    return until_closed(s)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                return b""

    assert attempt(context(20, 4096), "/under").startswith(b"HTTP/1.1 200")  # 80 KiB and the leaf: served
    many, huge = context(40, 4096), context(1, 1024 * 1024)
    for ctx in (many, huge):
        attempt(ctx, "/big")  # the allocator's arenas grow once
    before = rss_kb(api.proc.pid)
    for _ in range(6):
        for ctx in (many, huge):
            assert b"HTTP/1.1" not in attempt(ctx, "/big")
    grown = rss_kb(api.proc.pid) - before
    assert grown < 3 * 1024, f"{grown} KiB more after 6 MiB of refused chains"  # a kept chain: 1 MiB each
    assert app.arrived["/big"] == 0 and stats(api)["downstream_cx_tls_refused"] == 14
    found = rows(collector, api, 14, "error = 'tls_handshake'")
    assert len(found) == 14 and all(r["attributes"]["tls_error"] == "excessive message size" for r in found), found
    still_serving(web, api)
    settled(web, api)

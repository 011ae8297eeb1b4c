"""Connections that are not HTTP/1.x: sniffed on their first bytes, passed through, recorded as one call each.

Real sockets, real proxy processes and a real collector: TLS to a TLS echo server (SNI and
ALPN in the record), the HTTP/2 preface, raw TCP (half-close, resets, refused, server-first),
and garbage first bytes that must never crash the proxy.
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meshlens.protocols.sniff import H2_PREFACE
from meshlens.proxy.passthrough import SNIFF_TIMEOUT
from tests.collector_process import CollectorProcess
from tests.proxy.conftest import free_port
from tests.proxy.processes import EchoService, ProxyProcess, recorded_calls, self_signed_cert
from tests.proxy.wire import read_all
from tests.waiting import PATIENCE_S, wait_until

SNI = "svc.example"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """collector; a raw echo app and a TLS echo app, each behind its own sidecar (inbound); a sidecar to nothing."""
    tmp = tmp_path_factory.mktemp("sniff")
    cert = self_signed_cert(tmp, SNI)
    col = CollectorProcess(tmp / "collector").start()
    raw, tls = EchoService(), EchoService(tls=cert)
    started: list[ProxyProcess] = []
    try:
        url = f"{col.base}/v1/calls"
        for name, port in (("echo", raw.port), ("tlsecho", tls.port), ("gone", free_port())):
            p = ProxyProcess(tmp / name, json.dumps({"services": {name: {}}}), name, "--app-port", str(port),
                             "--collector", url)
            started.append(p.start())
        yield {"col": col, "raw": raw, "tls": tls, "cert": cert, "echo": started[0], "tlsecho": started[1],
               "gone": started[2]}
    finally:
        for p in started:
            p.stop()
            p.kill()
        raw.stop()
        tls.stop()
        col.stop()
        col.kill()


def _calls(env, sock_port: int, n: int = 1) -> list[dict]:
    return recorded_calls(env["col"].query_url, f"src_port = {sock_port}", n)


def _echo(port: int, chunks: list[bytes]) -> tuple[bytes, int]:
    """Send `chunks`, half-close, read to EOF; (what came back, our port)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as s:
        ours = s.getsockname()[1]
        try:
            for c in chunks:
                s.sendall(c)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # reset already (a refused destination): what was read is what counts
            pass
        return read_all(s), ours


def _client_ctx(cert, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


@pytest.mark.parametrize("max_version, version", [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")])
def test_tls_passes_through_and_its_hellos_are_recorded(env, max_version, version):
    with socket.create_connection(("127.0.0.1", env["tlsecho"].inbound), timeout=PATIENCE_S) as raw:
        port = raw.getsockname()[1]
        with _client_ctx(env["cert"], max_version).wrap_socket(raw, server_hostname=SNI) as s:
            assert s.version() == version and s.selected_alpn_protocol() == "http/1.1"
            s.sendall(b"hello over tls")
            assert s.recv(100) == b"hello over tls"
    assert SNI in env["tls"].sni  # the certificate check passed: the server's own certificate came through
    (call,) = _calls(env, port)
    assert (call["protocol"], call["authority"], call["tls"], call["observer"]) == ("tls", SNI, True, "server")
    assert call["dst_service"] == "tlsecho" and call["dst_port"] == env["tls"].port and call["error"] == ""
    attrs = call["attributes"]
    assert attrs["tls_client_alpn"] == "h2,http/1.1" and attrs["tls_version"] == version
    assert version in attrs["tls_client_versions"].split(",")
    if version == "TLSv1.2":  # TLS 1.3 encrypts the server's ALPN choice
        assert attrs["tls_alpn"] == "http/1.1"
    assert call["request_bytes"] > 200 and call["response_bytes"] > 200  # hellos, certificate, records


def test_the_h2_preface_even_split_is_http2_the_sidecar_answers_with_its_settings(env):
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    out, _ = _echo(env["echo"].inbound, [H2_PREFACE[:10], H2_PREFACE[10:] + settings_frame])
    frames, pos = [], 0  # (type, flags, stream) of each frame the sidecar sent: no echo of ours
    while pos + 9 <= len(out):
        frames.append((out[pos + 3], out[pos + 4], int.from_bytes(out[pos + 5:pos + 9], "big")))
        pos += 9 + int.from_bytes(out[pos:pos + 3], "big")
    assert pos == len(out) and frames[0] == (0x4, 0, 0) and (0x4, 0x1, 0) in frames  # its SETTINGS, our ACK


def test_raw_tcp_echoes_both_ways_with_half_close(env):
    chunks = [b"\x00raw", b" tcp ", b"x" * 3_000_000]
    out, port = _echo(env["echo"].inbound, chunks)
    assert out == b"".join(chunks)
    (call,) = _calls(env, port)
    n = len(out)
    assert (call["protocol"], call["request_bytes"], call["response_bytes"], call["error"]) == ("tcp", n, n, "")
    assert call["dst_service"] == "echo" and call["method"] == "" and call["status"] == 0


def test_a_client_reset_mid_tunnel_is_recorded(env):
    s = socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S)
    port = s.getsockname()[1]
    s.sendall(b"\x01abc")
    assert s.recv(10) == b"\x01abc"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    (call,) = _calls(env, port)
    assert (call["protocol"], call["error"], call["attributes"]["close"]) == ("tcp", "reset", "rst")
    assert call["request_bytes"] == 4


def test_a_server_reset_mid_tunnel_reaches_the_client(env):
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        s.sendall(b"\x01abc")
        assert s.recv(10) == b"\x01abc"
        s.sendall(b"RESET")
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    (call,) = _calls(env, port)
    assert (call["error"], call["request_bytes"], call["response_bytes"]) == ("reset", 9, 4)


def test_a_refused_destination_closes_the_client(env):
    out, port = _echo(env["gone"].inbound, [b"\x02hello"])
    assert out == b""
    (call,) = recorded_calls(env["col"].query_url, f"src_port = {port}",
                             columns=("protocol", "error", "response_flags", "dst_service"))
    assert call == {"protocol": "tcp", "error": "refused", "response_flags": "UF", "dst_service": "gone"}


def test_outbound_without_an_original_destination_is_closed(env):
    out, port = _echo(env["echo"].outbound, [b"\x03not http"])
    assert out == b""
    (call,) = _calls(env, port)
    assert (call["observer"], call["protocol"], call["error"]) == ("client", "tcp", "protocol_error")


def _tunnels_opened(p: ProxyProcess) -> float:
    """The sidecar's tcp_connections_opened_total: a tunnel counts when the proxy decides to pass bytes through."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports['metrics']}/metrics", timeout=PATIENCE_S).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith("meshlens_tcp_connections_opened_total{"))


def test_a_client_that_waits_for_the_server_is_passed_through(env):
    """Server-first protocols (MySQL, SMTP) send nothing first: after SNIFF_TIMEOUT the bytes just pass."""
    before = _tunnels_opened(env["echo"])
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        # SNIFF_TIMEOUT of silence, then the proxy decides: wait for the decision, not for a clock
        wait_until(lambda: _tunnels_opened(env["echo"]) > before, f"a tunnel after {SNIFF_TIMEOUT:g} s of silence")
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP after the decision: tunnelled, not parsed
        out = s.recv(1000)
        assert out.startswith(b"HTTP/1.1 200 OK") and b"traceparent" not in out
    (call,) = _calls(env, port)
    assert call["protocol"] == "tcp" and call["request_bytes"] == 29


def test_an_idle_tunnel_is_closed(env, tmp_path):
    p = ProxyProcess(tmp_path, json.dumps({"services": {"echo": {}}}), "echo", "--app-port", str(env["raw"].port),
                     "--collector", f"{env['col'].base}/v1/calls", "--idle-timeout", "0.5")
    p.start()
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S) as s:
            port = s.getsockname()[1]
            s.sendall(b"\x00still there?")
            assert s.recv(100) == b"\x00still there?"
            assert s.recv(100) == b""  # nothing more either way: the proxy closes both sides
    finally:
        assert p.stop() == 0
        p.kill()
    (call,) = _calls(env, port)
    assert (call["protocol"], call["error"], call["attributes"]["close"]) == ("tcp", "", "idle")


def test_tcp_metrics(env):
    p = env["echo"]
    assert _echo(p.inbound, [b"\x00counted"])[0] == b"\x00counted"
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.ports['metrics']}/metrics", timeout=PATIENCE_S).read().decode()
    labels = 'reporter="destination",source_workload="",destination_service="echo"'
    for name in ("tcp_connections_opened_total", "tcp_received_bytes_total", "tcp_sent_bytes_total"):
        assert f"meshlens_{name}{{{labels}}} " in text, text
    assert f'meshlens_tcp_connections_closed_total{{{labels},response_flags="-"}} ' in text


# -- garbage first bytes ------------------------------------------------------------------------

_STARTS = [b"\x16\x03\x01", b"\x16\x03\x03\x00\x05\x01\x00\x00\x01", b"\x16", b"\x16\x02", H2_PREFACE, H2_PREFACE[:7],
           b"PRI ", b"GET ", b"G", b"CONNECT ", b"\x00", b"\xff" * 4, b"SSH-2.0-x\r\n", b"\r\n"]
garbage = st.tuples(st.sampled_from(_STARTS), st.binary(max_size=200)).map(b"".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(garbage, st.binary(max_size=300)), outbound=st.booleans())
def test_garbage_first_bytes_never_break_the_proxy(env, data, outbound):
    p = env["echo"]
    with socket.create_connection(("127.0.0.1", p.outbound if outbound else p.inbound), timeout=PATIENCE_S) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us already: fine, the proxy must only survive it
        read_all(s)
    assert p.alive()


def test_still_passing_through_after_the_garbage(env):
    out, _ = _echo(env["echo"].inbound, [b"\x00after"])
    assert out == b"\x00after"
    with socket.create_connection(("127.0.0.1", env["tlsecho"].inbound), timeout=PATIENCE_S) as raw:
        with _client_ctx(env["cert"]).wrap_socket(raw, server_hostname=SNI) as s:
            s.sendall(b"still")
            assert s.recv(10) == b"still"
    for name in ("echo", "tlsecho", "gone"):
        assert env[name].alive()
        log = env[name].log.read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]

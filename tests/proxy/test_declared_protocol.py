"""mesh.yaml's `protocol` replaces sniffing (Istio's explicit protocol selection), on real sockets.

Each app is an echo server (tests/proxy/processes.py `_Echo`: bytes echoed, `GET /ok` answered as
HTTP) behind its own sidecar whose service declares a protocol: `tcp` passes HTTP through unparsed,
`tls` passes anything through and records what it could read of the hellos, `http` answers what is
not HTTP/1.1 with 400 where sniffing would have passed it through. Transparent outbound (the
original destination's declared protocol) runs in network namespaces, as tests/proxy/test_transparent.py.
"""
from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from meshlens.protocols.sniff import H2_PREFACE
from tests.collector_process import CollectorProcess
from tests.proxy.meshnet import APP_PORT, MeshNet, client_and_server
from tests.proxy.processes import EchoService, ProxyProcess, recorded_calls, self_signed_cert
from tests.proxy.wire import read_all
from tests.waiting import PATIENCE_S

SNI = "declared.example"
HTTP_GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A collector; an echo app behind sidecars declaring tcp, tls and http; a TLS echo behind one declaring tls."""
    tmp = tmp_path_factory.mktemp("declared")
    cert = self_signed_cert(tmp, SNI)
    col = CollectorProcess(tmp / "collector").start()
    raw, tls = EchoService(), EchoService(tls=cert)
    started: dict[str, ProxyProcess] = {}
    try:
        for name, protocol, port in (("as-tcp", "tcp", raw.port), ("as-tls", "tls", raw.port),
                                     ("as-http", "http", raw.port), ("real-tls", "tls", tls.port)):
            mesh = json.dumps({"services": {name: {"protocol": protocol}}})
            started[name] = ProxyProcess(tmp / name, mesh, name, "--app-port", str(port),
                                         "--collector", f"{col.base}/v1/calls").start()
        yield {"col": col, "cert": cert, **started}
    finally:
        for p in started.values():
            p.stop()
            p.kill()
        raw.stop()
        tls.stop()
        col.stop()
        col.kill()


def _send(port: int, data: bytes) -> tuple[bytes, int]:
    """Send `data`, half-close, read to EOF; (what came back, our port)."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as s:
        ours = s.getsockname()[1]
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s), ours


def _call(env: dict, port: int) -> dict:
    (call,) = recorded_calls(env["col"].query_url, f"src_port = {port}")
    return call


def test_tcp_passes_http_through_without_parsing_it(env: dict) -> None:
    out, port = _send(env["as-tcp"].inbound, HTTP_GET)
    assert out.startswith(b"HTTP/1.1 200 OK") and b"traceparent" not in out  # the app's answer, untouched
    call = _call(env, port)
    assert (call["protocol"], call["method"], call["path"], call["status"]) == ("tcp", "", "", 0)
    assert (call["request_bytes"], call["dst_service"], call["error"]) == (len(HTTP_GET), "as-tcp", "")


def test_tcp_records_an_h2_preface_as_tcp(env: dict) -> None:
    """Sniffed, this connection would be h2: declared tcp, it is what the mesh says."""
    out, port = _send(env["as-tcp"].inbound, H2_PREFACE)
    assert out == H2_PREFACE
    assert _call(env, port)["protocol"] == "tcp"


def test_tls_records_the_hellos_of_real_tls(env: dict) -> None:
    with socket.create_connection(("127.0.0.1", env["real-tls"].inbound), timeout=PATIENCE_S) as raw:
        port = raw.getsockname()[1]
        ctx = ssl.create_default_context(cafile=str(env["cert"][0]))
        with ctx.wrap_socket(raw, server_hostname=SNI) as s:
            s.sendall(b"over tls")
            assert s.recv(100) == b"over tls"
    call = _call(env, port)
    assert (call["protocol"], call["tls"], call["authority"], call["error"]) == ("tls", True, SNI, "")
    assert call["attributes"]["tls_version"] == "TLSv1.3"


def test_tls_passes_what_is_not_tls_through_and_says_so(env: dict) -> None:
    out, port = _send(env["as-tls"].inbound, HTTP_GET)
    assert out.startswith(b"HTTP/1.1 200 OK")  # passed through, never parsed as HTTP
    call = _call(env, port)
    assert (call["protocol"], call["tls"], call["method"], call["authority"]) == ("tls", True, "", "")
    assert call["attributes"]["tls_parse_error"]


@pytest.mark.parametrize("first", [H2_PREFACE, b"\x00raw bytes", b"\x16\x03\x01\x00\x05hello"],
                         ids=["h2-preface", "binary", "tls-record"])
def test_http_answers_what_is_not_http1_with_400(env: dict, first: bytes) -> None:
    """Sniffing would pass these through (h2, tcp, tls); declared http, they are a protocol error."""
    out, port = _send(env["as-http"].inbound, first)
    assert out.startswith(b"HTTP/1.1 400 ")
    call = _call(env, port)
    assert (call["protocol"], call["status"], call["error"]) == ("http/1.1", 400, "protocol_error")


def test_http_still_parses_http(env: dict) -> None:
    out, port = _send(env["as-http"].inbound, HTTP_GET)
    assert out.startswith(b"HTTP/1.1 200 OK")
    call = _call(env, port)
    assert (call["protocol"], call["method"], call["path"], call["status"]) == ("http/1.1", "GET", "/ok", 200)


def test_no_sidecar_logged_a_traceback(env: dict) -> None:
    for name in ("as-tcp", "as-tls", "as-http", "real-tls"):
        assert env[name].alive()
        assert "Traceback" not in env[name].log.read_text()


# -- transparent outbound: the original destination's declared protocol ---------------------------


class _TcpServerMesh(MeshNet):
    @property
    def mesh(self) -> dict:
        doc = super().mesh
        doc["services"]["server"]["protocol"] = "tcp"
        return doc


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshNet]:
    with client_and_server(tmp_path_factory.mktemp("declared-net"), "mldp", _TcpServerMesh) as net:
        yield net


def test_a_redirected_call_to_a_tcp_service_is_tunnelled_by_both_sidecars(net: MeshNet) -> None:
    client, server = net.nodes["client"], net.nodes["server"]
    r = net.curl(client.ns, f"http://{server.ip}:{APP_PORT}/call")
    assert json.loads(r.stdout)["service"] == "server"  # the bytes went through, unparsed
    net.stop_sidecars()
    calls = net.calls(2, "observer, protocol, method, status, dst_service, error")
    assert sorted((c["observer"], c["protocol"], c["method"], c["status"], c["dst_service"], c["error"])
                  for c in calls) == [("client", "tcp", "", 0, "server", ""), ("server", "tcp", "", 0, "server", "")]

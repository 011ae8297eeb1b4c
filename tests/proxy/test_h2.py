"""HTTP/2 and gRPC through two sidecars, end to end: a grpcio client -> sidecar web (outbound) -> sidecar backend
(inbound) -> a grpcio server, and curl. Each call is one record on each side, with the method, the gRPC status
and the trace the peers saw, call for call; an HTTP/1.1 client of a service declared grpc is carried over."""
from __future__ import annotations

import collections
import json
import shutil
import struct
import subprocess
from typing import Any

import grpc
import pytest

from tests.collector_process import CollectorProcess
from tests.grpc_peers import SERVICE, grpc_server, run_grpc_client
from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess, recorded_calls
from tests.tap.test_h2_live import nginx_h2c  # noqa: F401  (a fixture)
from tests.waiting import PATIENCE_S

COLUMNS = ("observer", "trace_id", "span_id", "parent_span_id", "src_service", "dst_service", "protocol", "method",
           "route", "path", "authority", "status", "grpc_status", "request_bytes", "response_bytes", "error",
           "response_flags", "attributes")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """collector; sidecar backend (inbound to a grpcio server); sidecar web (outbound to it, and to `legacy`, the
    same server declared grpc, and `dead`, nothing listening)."""
    tmp = tmp_path_factory.mktemp("h2")
    col = CollectorProcess(tmp / "collector").start()
    started: list[ProxyProcess] = []
    with grpc_server() as port:
        try:
            url = f"{col.base}/v1/calls"
            b = ProxyProcess(tmp / "b", json.dumps({"services": {"backend": {}}}), "backend",
                             "--app-port", str(port), "--collector", url)
            started.append(b.start())
            mesh_a = {"services": {"web": {}, "backend": {"instances": [f"127.0.0.1:{b.inbound}"]},
                                   "legacy": {"protocol": "grpc", "instances": [f"127.0.0.1:{port}"]},
                                   "dead": {"instances": [f"127.0.0.1:{free_port()}"]}}}
            a = ProxyProcess(tmp / "a", json.dumps(mesh_a), "web", "--collector", url)
            started.append(a.start())
            yield col, a, b
        finally:
            for p in started:
                p.stop()
                p.kill()
            col.stop()
            col.kill()


def rows(col: CollectorProcess, where: str, n: int) -> list[dict]:
    return recorded_calls(col.query_url, where, n, columns=COLUMNS)


def grpc_message(payload: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed), as a client puts it in DATA."""
    return struct.pack(">BI", 0, len(payload)) + payload


def test_grpc_behind_two_sidecars_is_one_record_per_call_on_each_side_as_the_peers_saw_it(chain) -> None:
    col, a, b = chain
    seen = run_grpc_client(a.outbound, authority="backend")
    slow = f"/{SERVICE}/Slow"
    assert seen[(slow, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])] == 1
    n = sum(seen.values())
    got = rows(col, f"dst_service = 'backend' AND path LIKE '/{SERVICE}/%'", 2 * n)
    client = [r for r in got if r["observer"] == "client"]
    server = [r for r in got if r["observer"] == "server"]
    assert len(client) == len(server) == n, got
    for side in (client, server):
        assert {(r["protocol"], r["method"] == r["path"] == r["route"], r["authority"]) for r in side} == {
            ("grpc", True, "backend")}
        # the client's deadline ends Slow: its reset (DR) at both sidecars, or the server's own DEADLINE_EXCEEDED
        done = collections.Counter((r["path"], r["grpc_status"]) for r in side if r["path"] != slow)
        assert done == seen - collections.Counter({(slow, 4): 1})
        late = next(r for r in side if r["path"].endswith("/FailLate"))
        assert late["attributes"]["grpc.message"] == "stop here" and late["response_bytes"] == 5 + 3
        fail = next(r for r in side if r["path"].endswith("/Fail"))
        assert (fail["status"], fail["grpc_status"], fail["response_bytes"]) == (200, 5, 0)
        assert fail["attributes"]["grpc.message"] == "no such user: é"
        stream = next(r for r in side if r["path"].endswith("/Stream"))
        assert (stream["request_bytes"], stream["response_bytes"]) == (5 + 10, 3 * (5 + 6))
        (s,) = [r for r in side if r["path"] == slow]
        assert s["grpc_status"] == 4 or (s["error"], s["response_flags"]) == ("downstream_reset", "DR"), s
    for c in client:  # one trace across the two sidecars: the server's parent is the client's span
        (s,) = [s for s in server if s["trace_id"] == c["trace_id"]]
        assert s["parent_span_id"] == c["span_id"] and s["path"] == c["path"]
        assert s["attributes"]["x_request_id"] == c["attributes"]["x_request_id"]


def test_curl_with_prior_knowledge_is_a_grpc_call_with_its_trailers(chain) -> None:
    col, a, _ = chain
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: run scripts/install-system.sh")
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", f"{PATIENCE_S:g}", "-D", "-",
                          "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "Host: backend",
                          "--data-binary", "@-", f"http://127.0.0.1:{a.outbound}/{SERVICE}/Hello"],
                         input=grpc_message(b"curl"), capture_output=True, timeout=PATIENCE_S + 30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"HTTP/2 200") and grpc_message(b"hi curl") in out.stdout, out.stdout
    assert b"grpc-status: 0" in out.stdout  # curl -D prints the trailers after the body
    (r,) = rows(col, f"observer = 'client' AND path = '/{SERVICE}/Hello' AND request_bytes = 9", 1)
    assert (r["protocol"], r["grpc_status"], r["response_bytes"]) == ("grpc", 0, 12)


def test_an_http1_client_of_a_service_declared_grpc_goes_on_as_http2_and_gets_the_trailers_chunked(chain) -> None:
    """A gRPC call over HTTP/1.1 is recorded and judged as a gRPC call: its method path as method and route, its
    grpc-status from the trailers, its grpc-timeout honoured; a plain HTTP/1.1 request stays http/1.1."""
    col, a, _ = chain
    import http.client

    def call(method: str, payload: bytes, **fields: str) -> tuple[int, bytes, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", a.outbound, timeout=PATIENCE_S)
        conn.request("POST", f"/{SERVICE}/{method}", body=grpc_message(payload),
                     headers={"Host": "legacy", "content-type": "application/grpc", "te": "trailers", **fields})
        resp = conn.getresponse()
        got = resp.status, resp.read(), resp.headers
        conn.close()
        return got

    status, body, head = call("Hello", b"from http/1.1")
    assert (status, head.get("Transfer-Encoding")) == (200, "chunked")
    assert body == grpc_message(b"hi from http/1.1")
    status, body, _ = call("FailLate", b"late")
    assert (status, body) == (200, grpc_message(b"one"))  # a message, then the status in the trailers
    status, _, _ = call("Slow", b"", **{"grpc-timeout": "300m"})
    assert status in (200, 504)  # the sidecar's deadline (504 UT) or the server's own (grpc-status 4)
    got = {r["path"].rsplit("/", 1)[1]: r for r in rows(col, "observer = 'client' AND dst_service = 'legacy'", 3)}
    hello, late, slow = got["Hello"], got["FailLate"], got["Slow"]
    assert (hello["protocol"], hello["method"], hello["route"], hello["status"], hello["grpc_status"],
            hello["request_bytes"]) == ("grpc", f"/{SERVICE}/Hello", f"/{SERVICE}/Hello", 200, 0, 5 + 13)
    assert (late["grpc_status"], late["attributes"]["grpc.message"]) == (7, "stop here")
    assert (slow["status"], slow["response_flags"]) == (504, "UT") or slow["grpc_status"] == 4, slow


def test_a_grpc_call_to_a_service_that_cannot_be_reached_is_unavailable_with_the_reason(chain) -> None:
    col, a, _ = chain
    with grpc.insecure_channel(f"127.0.0.1:{a.outbound}", options=[("grpc.default_authority", "dead")]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(f"/{SERVICE}/Hello")(b"x", timeout=PATIENCE_S)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details().startswith("upstream connect error")
    (r,) = rows(col, "observer = 'client' AND dst_service = 'dead'", 1)
    assert (r["protocol"], r["status"], r["grpc_status"], r["error"], r["response_flags"]) == (
        "grpc", 200, 14, "refused", "UF")


def test_a_drain_lets_the_streams_in_flight_finish_after_its_goaway(tmp_path) -> None:
    import signal
    import threading

    arrived, release = threading.Event(), threading.Event()

    def held(request: bytes, context: grpc.ServicerContext) -> bytes:
        arrived.set()
        release.wait(PATIENCE_S)
        return b"finished"

    from tests.grpc_peers import METHODS

    with grpc_server({**METHODS, "Held": grpc.unary_unary_rpc_method_handler(held)}) as port:
        proxy = ProxyProcess(tmp_path / "b", json.dumps({"services": {"backend": {}}}), "backend",
                             "--app-port", str(port), "--no-record", "--drain-timeout", "60").start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.inbound}") as ch:
                result: list = []
                t = threading.Thread(target=lambda: result.append(ch.unary_unary(f"/{SERVICE}/Held")(
                    b"", timeout=PATIENCE_S)))
                t.start()
                assert arrived.wait(PATIENCE_S)
                proxy.proc.send_signal(signal.SIGTERM)  # GOAWAY; the held stream goes on
                release.set()
                t.join(PATIENCE_S)
                assert result == [b"finished"]
            assert proxy.proc.wait(PATIENCE_S) == 0  # and the drain ends with the last stream
        finally:
            proxy.kill()


def test_large_messages_both_ways_pass_intact_through_the_windows(chain) -> None:
    """Bodies many windows long (64 KiB a grpcio stream starts with; the sidecars grant 1 MiB): flow control
    carries them both ways, up in a client stream, down in a server stream."""
    col, a, _ = chain
    with grpc.insecure_channel(f"127.0.0.1:{a.outbound}", options=[("grpc.default_authority", "backend")]) as ch:
        pieces = [bytes([i]) * (1024 * 1024) for i in range(3)]  # 3 MiB up, in three messages
        assert ch.stream_unary(f"/{SERVICE}/Upload")(iter(pieces), timeout=PATIENCE_S) == b"%d" % (3 << 20)
        echoed = list(ch.unary_stream(f"/{SERVICE}/Echo")(b"z" * 1_500_000, timeout=PATIENCE_S))
    assert echoed == [b"z" * 1_500_000] * 2
    (up,) = rows(col, f"observer = 'client' AND path = '/{SERVICE}/Upload'", 1)
    assert (up["grpc_status"], up["request_bytes"]) == (0, 3 * (5 + (1 << 20)))
    (down,) = rows(col, f"observer = 'server' AND path = '/{SERVICE}/Echo'", 1)
    assert (down["grpc_status"], down["response_bytes"]) == (0, 2 * (5 + 1_500_000))


def test_h2c_by_upgrade_and_http1_go_to_an_http2_only_server_as_http2(nginx_h2c, tmp_path) -> None:
    """nginx serving h2c only, as the app of a sidecar whose service is declared http2: `curl --http2` upgrades
    its connection to the sidecar (101 here, the request stream 1), plain HTTP/1.1 is carried over; nginx sees
    HTTP/2 for both. A bad HTTP2-Settings is refused 400."""
    from tests.tap.test_h2_live import served

    d, port = nginx_h2c
    mesh = {"services": {"backend": {"protocol": "http2", "instances": [f"127.0.0.1:{port}"]}}}
    with ProxyProcess(tmp_path / "b", json.dumps(mesh), "backend", "--app-port", str(port), "--no-record").start() as b:
        url = f"http://127.0.0.1:{b.inbound}"
        up = subprocess.run(["curl", "-sS", "-v", "--http2", f"{url}/upgraded"], capture_output=True,
                            timeout=PATIENCE_S)
        assert up.stdout == b"ok\n" and b"< HTTP/1.1 101" in up.stderr and b"< HTTP/2 200" in up.stderr, up.stderr
        plain = subprocess.run(["curl", "-sS", "-i", f"{url}/plain"], capture_output=True, timeout=PATIENCE_S)
        assert plain.stdout.startswith(b"HTTP/1.1 200") and plain.stdout.endswith(b"\r\n\r\nok\n"), plain.stdout
        bad = subprocess.run(["curl", "-sS", "-i", "-H", "Connection: Upgrade, HTTP2-Settings", "-H", "Upgrade: h2c",
                              "-H", "HTTP2-Settings: not*base64", f"{url}/bad"], capture_output=True,
                             timeout=PATIENCE_S)
        assert bad.stdout.startswith(b"HTTP/1.1 400") and b"HTTP2-Settings" in bad.stdout, bad.stdout
        stats = json.loads(subprocess.run(["curl", "-sS", f"http://127.0.0.1:{b.ports['admin']}/stats"],
                                          capture_output=True, timeout=PATIENCE_S).stdout)
        assert stats["downstream_cx_http2_upgrade"] == 1
    assert served(d / "access.log", 2) == collections.Counter({("GET", "/upgraded", 200): 1, ("GET", "/plain", 200): 1})


def test_an_http2_client_of_a_service_declared_http_goes_on_as_http1_and_back(tmp_path) -> None:
    """curl speaking HTTP/2 to the outbound listener, the destination an HTTP/1.1-only aiohttp app declared http:
    the request is carried over (a body of unknown length chunked), the response comes back as HTTP/2."""
    from tests.proxy.processes import SampleService

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: run scripts/install-system.sh")
    app = SampleService().start()
    try:
        mesh = {"services": {"web": {}, "legacy": {"protocol": "http", "instances": [f"127.0.0.1:{app.port}"]}}}
        with ProxyProcess(tmp_path / "a", json.dumps(mesh), "web", "--no-record").start() as a:
            base = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", f"{PATIENCE_S:g}", "-H", "Host: legacy"]
            hello = subprocess.run([*base, "-i", f"http://127.0.0.1:{a.outbound}/hello"], capture_output=True,
                                   timeout=PATIENCE_S + 30)
            assert hello.stdout.startswith(b"HTTP/2 200") and hello.stdout.endswith(b"hello\n"), hello
            body = b"b" * 300_000
            echo = subprocess.run([*base, "-T", "-", "-X", "POST", f"http://127.0.0.1:{a.outbound}/echo"],
                                  input=body, capture_output=True, timeout=PATIENCE_S + 30)  # stdin: no length
            assert echo.stdout == body, (len(echo.stdout), echo.stderr)
            chunked = subprocess.run([*base, f"http://127.0.0.1:{a.outbound}/chunked"], capture_output=True,
                                     timeout=PATIENCE_S + 30)
            assert chunked.stdout == b"".join(b"chunk %d\n" % i for i in range(5)), chunked  # unframed for DATA
    finally:
        app.stop()


def test_a_burst_on_a_new_upstream_connection_keeps_to_the_servers_stream_limit(nginx_h2c, tmp_path) -> None:
    """400 streams at once from four h2load connections (100 each, under the sidecar's 128), the sidecar's upstream
    connection to nginx (128 concurrent streams, and it closes a connection that opens more than 2 x 128 at once)
    not yet open: every request is answered 200, none lost to the server's GOAWAY."""
    d, port = nginx_h2c
    mesh = {"services": {"backend": {"instances": [f"127.0.0.1:{port}"]}}}
    with ProxyProcess(tmp_path / "b", json.dumps(mesh), "backend", "--app-port", str(port), "--no-record").start() as b:
        out = subprocess.run(["h2load", "-n", "1200", "-c", "4", "-m", "100", f"http://127.0.0.1:{b.inbound}/burst"],
                             capture_output=True, text=True, timeout=PATIENCE_S * 2)
    assert "1200 succeeded, 0 failed" in out.stdout and "status codes: 1200 2xx" in out.stdout, out.stdout

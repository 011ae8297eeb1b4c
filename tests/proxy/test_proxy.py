"""The data plane end to end: curl, http.client and raw sockets through a real proxy process."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import socket
import subprocess
import time

import pytest

from tests.proxy.conftest import HEADER_TIMEOUT_S
from tests.proxy.processes import rss_kb
from tests.proxy.wire import exchange, normalize, read_all
from tests.waiting import PATIENCE_S


def curl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", f"{PATIENCE_S:g}", *args], input=input, capture_output=True,
                          timeout=PATIENCE_S + 30)


def test_inbound_forwards_and_adds_trace_context(proxy, upstream):
    r = curl(f"http://127.0.0.1:{proxy.inbound}/headers")
    seen = json.loads(r.stdout)
    assert seen["host"] == f"127.0.0.1:{proxy.inbound}"
    assert len(seen["traceparent"].split("-")[1]) == 32 and seen["x-request-id"]
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = curl("-H", f"traceparent: {tp}", "-H", "x-request-id: abc", "-H", "Connection: keep-alive, X-Hop",
             "-H", "X-Hop: 1", "-H", "X-Keep: 2", f"http://127.0.0.1:{proxy.inbound}/headers")
    seen = json.loads(r.stdout)
    assert seen["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert seen["traceparent"].split("-")[2] != "00f067aa0ba902b7"  # a new span, the caller's is its parent
    assert seen["x-request-id"] == "abc" and seen["x-keep"] == "2" and "x-hop" not in seen


def test_outbound_as_forward_proxy_and_by_host_header(proxy, upstream):
    r = curl("-x", f"http://127.0.0.1:{proxy.outbound}", "http://backend/hello")
    assert r.stdout == b"hello\n"
    r = curl("-x", f"http://127.0.0.1:{proxy.outbound}", f"http://127.0.0.1:{upstream.port}/hello?x=1")
    assert r.stdout == b"hello\n"
    r = curl("-H", "Host: backend", f"http://127.0.0.1:{proxy.outbound}/hello")
    assert r.stdout == b"hello\n"


def test_chunked_upload_streams_through(proxy):
    body = os.urandom(3_000_000)
    r = curl("-T", "-", "-H", "Transfer-Encoding: chunked", "-D", "/dev/stderr", f"http://127.0.0.1:{proxy.inbound}/echo", input=body)
    assert r.stdout == body
    assert b"HTTP/1.1 100 Continue" in r.stderr  # curl -T asks for 100-continue on its own
    assert hashlib.sha256(body).hexdigest().encode() in r.stderr


def test_expect_100_continue(proxy):
    body = b"z" * 200_000
    r = curl("-v", "-H", "Expect: 100-continue", "--data-binary", "@-", f"http://127.0.0.1:{proxy.inbound}/echo", input=body)
    assert b"HTTP/1.1 100 Continue" in r.stderr
    assert r.stdout == body


def test_head_has_no_body_and_keeps_the_connection(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.inbound, timeout=PATIENCE_S)
    conn.request("HEAD", "/big?n=100000")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "100000" and resp.read() == b""
    conn.request("GET", "/hello")
    assert conn.getresponse().read() == b"hello\n"
    conn.close()
    r = curl("-I", f"http://127.0.0.1:{proxy.inbound}/hello")
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"Content-Length: 6" in r.stdout


def test_http10_client_gets_a_closed_body(proxy):
    # the sidecar forwards the version as sent: the app sees HTTP/1.0 and answers without length
    r = curl("--http1.0", "-D", "-", f"http://127.0.0.1:{proxy.inbound}/chunked?n=3")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"
    r = curl("--http1.0", f"http://127.0.0.1:{proxy.inbound}/hello")
    assert r.stdout == b"hello\n"


def test_keep_alive_and_pipelining(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.inbound, timeout=PATIENCE_S)
    for i in range(20):
        conn.request("POST", "/echo", body=b"n%d" % i)
        assert conn.getresponse().read() == b"n%d" % i
    conn.close()
    pipelined = b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\np%d" % i for i in range(5))
    pipelined += b"GET /chunked?n=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = exchange(proxy.inbound, pipelined)
    assert out.count(b"HTTP/1.1 200 OK") == 7
    for i in range(5):
        assert out.index(b"p%d" % i) < out.index(b"chunk 0")
    assert out.endswith(b"hello\n")


def test_upstream_refused_is_503(proxy):
    r = curl("-D", "-", "-H", "Host: dead", f"http://127.0.0.1:{proxy.outbound}/x")
    assert r.stdout.startswith(b"HTTP/1.1 503 ")
    assert r.stdout.endswith(b"upstream connect error: connection refused\n")


def test_upstream_reset_mid_response_closes_the_client(proxy):
    r = curl(f"http://127.0.0.1:{proxy.inbound}/reset")
    assert r.returncode in (18, 56)  # partial file / recv failure: the cut is visible to the client
    assert len(r.stdout) == 1000


def test_malformed_request_is_400_and_close(proxy):
    out = exchange(proxy.inbound, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in out
    assert curl(f"http://127.0.0.1:{proxy.inbound}/hello").stdout == b"hello\n"


def test_too_large_head_is_431(proxy):
    out = exchange(proxy.inbound, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    assert exchange(proxy.inbound, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431 ")


def test_slow_loris_hits_the_header_timeout(proxy):
    """A header line every 0.25 s for as long as it takes: the trickle must not hold the timer off."""
    with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=PATIENCE_S) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        while not select.select([s], [], [], 0.25)[0]:
            assert time.monotonic() - t0 < PATIENCE_S, "the header timeout never fired"
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        out = read_all(s)
        elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 ")
    assert elapsed > HEADER_TIMEOUT_S - 0.1  # not before the timeout (the clock started after the proxy's)


def test_a_slow_reader_does_not_make_the_proxy_buffer(proxy):
    n = 200 * 1024 * 1024
    before = rss_kb(proxy.proc.pid)
    with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=PATIENCE_S) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
        time.sleep(1.0)  # not reading: the proxy must stop reading the upstream
        grown = rss_kb(proxy.proc.pid) - before
        got = 0
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    assert grown < 20_000, f"proxy grew {grown} KiB while the client did not read"
    assert got > n


# Requests sent directly and through the proxy: the responses must match except for the
# proxy's own fields (traceparent, x-request-id, hop-by-hop framing) and Date.
CORPUS = [
    b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /hello?q=1&r=%20 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Odd-Case: VaLuE\r\n\r\n",
    b"HEAD /hello HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /chunked?n=4 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /status/304 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"DELETE /status/404 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /status/500 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /hello HTTP/1.0\r\nHost: a\r\n\r\n",
    b"OPTIONS /hello HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /big?n=300000 HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", CORPUS, ids=[r.split(b"\r\n")[0].decode() for r in CORPUS])
def test_differential_direct_vs_proxied(proxy, upstream, request_bytes):
    # each request closes the connection after it, so the whole answer is read to EOF
    req = request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1) if b"HTTP/1.1" in request_bytes.split(b"\r\n")[0] else request_bytes
    direct = normalize(exchange(upstream.port, req))
    proxied = normalize(exchange(proxy.inbound, req))
    assert proxied[0].split(b" ", 1)[1] == direct[0].split(b" ", 1)[1]
    assert proxied[1] == direct[1]
    assert proxied[2] == direct[2]


def test_admin_and_metrics(proxy):
    assert curl(f"http://127.0.0.1:{proxy.ports['admin']}/healthz").stdout == b"ok\n"
    stats = json.loads(curl(f"http://127.0.0.1:{proxy.ports['admin']}/stats").stdout)
    assert stats["downstream_rq_total"] > 0 and "upstream_cx_reused" in stats
    config = json.loads(curl(f"http://127.0.0.1:{proxy.ports['admin']}/config").stdout)
    assert config["service"] == "web" and config["listeners"]["inbound"] == proxy.inbound
    text = curl(f"http://127.0.0.1:{proxy.ports['metrics']}/stats/prometheus").stdout.decode()
    assert 'meshlens_requests_total{reporter="destination",source_workload="",destination_service="web",response_code="200",response_flags="-"}' in text
    # Envoy's flags, as Istio's metrics carry them: /reset is cut mid-response (UC), /dead refused (UF)
    assert 'response_code="200",response_flags="UC"}' in text and 'response_code="503",response_flags="UF"}' in text
    assert "meshlens_request_duration_milliseconds_bucket" in text and "meshlens_response_bytes_total" in text
    assert proxy.alive()


def test_outbound_refuses_to_loop_into_itself(proxy):
    r = curl("-D", "-", "-H", f"Host: 127.0.0.1:{proxy.outbound}", f"http://127.0.0.1:{proxy.outbound}/x")
    assert r.stdout.startswith(b"HTTP/1.1 508 ")


def test_a_large_upload_streams_with_bounded_memory(proxy):
    n = 300 * 1024 * 1024
    before = rss_kb(proxy.proc.pid)
    r = subprocess.run(f"head -c {n} /dev/zero | curl -sS --max-time {PATIENCE_S:g} -T - "
                       f"-H 'Transfer-Encoding: chunked' http://127.0.0.1:{proxy.inbound}/sink", shell=True,
                       capture_output=True, timeout=PATIENCE_S + 30)
    assert json.loads(r.stdout) == {"bytes": n}
    assert rss_kb(proxy.proc.pid) - before < 20_000


def test_a_slow_upstream_does_not_make_the_proxy_buffer(proxy):
    n = 100 * 1024 * 1024
    before = rss_kb(proxy.proc.pid)
    peak = [0]

    def watch(proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_kb(proxy.proc.pid) - before)
            time.sleep(0.05)

    proc = subprocess.Popen(f"head -c {n} /dev/zero | curl -sS --max-time {PATIENCE_S:g} --data-binary @- "
                            f"http://127.0.0.1:{proxy.inbound}/slowsink", shell=True, stdout=subprocess.PIPE)
    watch(proc)
    assert json.loads(proc.stdout.read()) == {"bytes": n}
    proc.stdout.close()
    assert peak[0] < 20_000, f"proxy grew {peak[0]} KiB with a slow upstream"


def test_no_errors_logged(proxy):
    """Last in this module: every failure above was the peer's, answered, never a traceback."""
    assert proxy.alive()
    log = proxy.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_admin_answers_what_it_does_not_serve_in_words(proxy):
    base = f"http://127.0.0.1:{proxy.ports['admin']}"
    r = curl("-i", "-X", "POST", f"{base}/stats")
    assert r.stdout.startswith(b"HTTP/1.1 405 ") and r.stdout.endswith(b"GET or HEAD only\n")
    r = curl("-i", f"{base}/nope")
    assert r.stdout.startswith(b"HTTP/1.1 404 ") and r.stdout.endswith(b"no page /nope\n")
    with socket.create_connection(("127.0.0.1", proxy.ports["admin"]), timeout=PATIENCE_S) as s:
        s.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    r = curl("-I", f"{base}/healthz")  # HEAD: the length of what GET would send, no body
    assert r.stdout.startswith(b"HTTP/1.1 200 ") and b"content-length: 3" in r.stdout
    assert curl(f"{base}/healthz").stdout == b"ok\n" and proxy.alive()

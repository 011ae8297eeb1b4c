"""Garbage on the request path never crashes the proxy or leaks connections or memory, and it keeps serving."""
from __future__ import annotations

import json
import socket
import urllib.request

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.proxy.processes import rss_kb
from tests.proxy.wire import read_all
from tests.waiting import PATIENCE_S, wait_until

_PIECES = [b"GET ", b"POST ", b"/", b"/echo", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"HTTP/2.0", b"Host: x\r\n",
           b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Upgrade: websocket\r\nConnection: upgrade\r\n",
           b"\r\n", b"\n", b"5\r\nhello\r\n", b"0\r\n\r\n", b"zz\r\n", b"\x00", b"\xff\xfe", b" ", b":", b"CONNECT a:1 HTTP/1.1\r\n"]

requestish = st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=40)), max_size=12).map(b"".join)


def _poke(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(requestish, st.binary(max_size=300)))
def test_garbage_never_breaks_the_proxy(proxy, data):
    out = _poke(proxy.inbound, data)
    # bytes that are not HTTP pass through to the app (tests/proxy/test_sniff.py), which may answer in its own version
    assert out == b"" or out.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))
    assert proxy.alive()


def test_still_serving_after_the_fuzzing(proxy):
    out = _poke(proxy.inbound, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello\n")
    assert proxy.alive()
    log = proxy.log.read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_garbage_leaks_neither_connections_nor_memory(proxy):
    """Rounds of 1,000 garbage connections leave no connection open, and once the first round
    has grown the allocator's arenas, another round leaves the RSS where it was (a leak grows
    by every round; a high-water mark does not)."""
    junk = [b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00" * 64, b"GET /hello HTTP/1.1\r\n" + b"X: y\r\n" * 200]

    def active() -> int:
        url = f"http://127.0.0.1:{proxy.ports['admin']}/stats"
        return json.load(urllib.request.urlopen(url, timeout=PATIENCE_S))["downstream_cx_active"]

    def round_of(n: int) -> int:
        for i in range(n):
            _poke(proxy.inbound, junk[i % len(junk)])
        wait_until(lambda: active() == 0, "no downstream connection left open", poll=0.1)  # they close asynchronously
        return rss_kb(proxy.proc.pid)

    round_of(300)  # warm-up: code paths and caches
    first = round_of(1000)
    grown = round_of(1000) - first
    assert grown < 5_000, f"RSS grew {grown} KiB over a second round of 1,000 garbage connections"

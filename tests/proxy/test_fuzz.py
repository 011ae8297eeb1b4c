"""Garbage on the request path never crashes the proxy, and it keeps serving after each."""
from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.proxy.wire import read_all

_PIECES = [b"GET ", b"POST ", b"/", b"/echo", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"HTTP/2.0", b"Host: x\r\n",
           b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Upgrade: websocket\r\nConnection: upgrade\r\n",
           b"\r\n", b"\n", b"5\r\nhello\r\n", b"0\r\n\r\n", b"zz\r\n", b"\x00", b"\xff\xfe", b" ", b":", b"CONNECT a:1 HTTP/1.1\r\n"]

requestish = st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=40)), max_size=12).map(b"".join)


def _poke(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s, 3)


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

"""HTTP Upgrade through the proxy: a 101 turns the connection into a tunnel, anything else stays HTTP.

A WebSocket echo (aiohttp server and client) and a raw upstream that answers 101, 426 or 200,
behind real proxy processes recording into a real collector: one http/1.1 call per upgraded
connection, status 101, its bytes counting what went through the tunnel.
"""
from __future__ import annotations

import asyncio
import json
import selectors
import socket
import struct

import aiohttp
import pytest

from tests.collector_process import CollectorProcess
from tests.proxy.processes import EchoService, ProxyProcess, WsService, recorded_calls, rss_kb
from tests.proxy.conftest import free_port
from tests.proxy.wire import exchange, read_all
from tests.waiting import PATIENCE_S

UPGRADE = b"GET /upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: echo-proto\r\nConnection: Upgrade\r\n\r\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """collector; a WebSocket app and a raw upgrade/echo app, each behind its own sidecar (inbound)."""
    tmp = tmp_path_factory.mktemp("tunnels")
    col = CollectorProcess(tmp / "collector").start()
    ws, raw = WsService(), EchoService()
    started: list[ProxyProcess] = []
    try:
        url = f"{col.base}/v1/calls"
        for name, port in (("ws", ws.port), ("echo", raw.port)):
            p = ProxyProcess(tmp / name, json.dumps({"services": {name: {}}}), name, "--app-port", str(port),
                             "--collector", url)
            started.append(p.start())
        yield {"col": col, "raw": raw, "ws": started[0], "echo": started[1]}
    finally:
        for p in started:
            p.stop()
            p.kill()
        ws.stop()
        raw.stop()
        col.stop()
        col.kill()


def _calls(env, sock_port: int, n: int = 1) -> list[dict]:
    return recorded_calls(env["col"].query_url, f"src_port = {sock_port}", n)


def _read_until(s: socket.socket, end: bytes) -> bytes:
    out = b""
    while not out.endswith(end):
        chunk = s.recv(65536)
        assert chunk, out
        out += chunk
    return out


def test_websocket_echo_through_the_proxy(env):
    big = bytes(range(256)) * 1000

    async def talk() -> tuple[int, int]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{env['ws'].inbound}/ws") as ws:
                port = ws._response.connection.transport.get_extra_info("sockname")[1]
                await ws.send_str("hello")
                assert (await ws.receive()).data == "echo:hello"
                await ws.send_bytes(b"abc")
                assert (await ws.receive()).data == b"cba"
                await ws.send_bytes(big)
                assert (await ws.receive()).data == big[::-1]
                await ws.close()
                assert ws.closed and ws.close_code == 1000
                return port, 0

    port, _ = asyncio.run(talk())
    (call,) = _calls(env, port)
    assert (call["protocol"], call["method"], call["path"], call["status"], call["error"]) == \
        ("http/1.1", "GET", "/ws", 101, "")
    payload = len("hello") + 3 + len(big)
    # frames each way: the payloads plus framing (masking keys on the client's side), plus the close frames
    assert payload < call["request_bytes"] < payload + 100
    assert payload + len("echo:") < call["response_bytes"] < payload + 100
    assert call["dst_service"] == "ws" and call["observer"] == "server"


def test_upgrade_fields_cross_and_buffered_bytes_are_not_lost(env):
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        s.sendall(UPGRADE + b"EARLY")  # tunnel bytes before the 101: held, then sent on after it
        out = _read_until(s, b"SERVER-FIRSTEARLY")  # the upstream's bytes right after its 101 head, then the echo
        head = out.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 101 ") and b"upgrade: echo-proto" in head and b"connection: upgrade" in head
        assert b"x-seen-upgrade: echo-proto" in head  # the request's Upgrade field reached the upstream
        s.sendall(b"more")
        assert _read_until(s, b"more").endswith(b"more")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""  # the upstream closed after our EOF, and so did the proxy
    sent = b"\r\n".join(h for h in env["raw"].heads if b"Upgrade: echo-proto" in h)
    assert b"connection: upgrade" in sent.lower()
    (call,) = _calls(env, port)
    assert (call["status"], call["path"], call["error"]) == (101, "/upgrade", "")
    assert call["attributes"].get("upgraded") == "true"
    assert (call["request_bytes"], call["response_bytes"]) == (len(b"EARLYmore"), len(b"SERVER-FIRSTEARLYmore"))


def test_a_half_close_before_the_101_reaches_the_upstream(env):
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        s.sendall(UPGRADE + b"LAST")
        s.shutdown(socket.SHUT_WR)  # before the answer: the EOF waits with the bytes, then follows them
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 101 ") and out.endswith(b"\r\n\r\nSERVER-FIRSTLAST")


@pytest.mark.parametrize("path, status", [(b"/refuse", b"426"), (b"/ok", b"200")])
def test_an_upgrade_answered_without_101_stays_http(env, path, status):
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        # an upgrade request and, pipelined right behind it, a plain one: HTTP again once the answer is not 101
        s.sendall(UPGRADE.replace(b"/upgrade", path) + b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = read_all(s)
    first, _, second = out.partition(b"HTTP/1.1 200 OK")
    if status == b"200":
        first, second = out.split(b"HTTP/1.1 200 OK")[1:3]
        assert b"x-seen-upgrade: echo-proto" in first.lower()
    else:
        assert first.startswith(b"HTTP/1.1 426 ") and first.endswith(b"no")
    assert b"x-seen-upgrade: -" in second.lower() and second.endswith(b"ok")  # the second came without Upgrade
    calls = _calls(env, port, 2)
    assert [(c["path"], c["status"], c["error"]) for c in calls] == [(path.decode(), int(status), ""), ("/ok", 200, "")]


def test_an_upstream_reset_in_the_tunnel_resets_the_client(env):
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        s.sendall(UPGRADE)
        _read_until(s, b"SERVER-FIRST")
        s.sendall(b"RESET")
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    (call,) = _calls(env, port)
    assert (call["status"], call["error"], call["request_bytes"]) == (101, "reset", 5)


def test_a_client_reset_in_the_tunnel_is_recorded(env):
    s = socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S)
    port = s.getsockname()[1]
    s.sendall(UPGRADE)
    _read_until(s, b"SERVER-FIRST")
    s.sendall(b"ping")
    _read_until(s, b"ping")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    (call,) = _calls(env, port)
    assert (call["status"], call["error"], call["request_bytes"], call["response_bytes"]) == (101, "reset", 4, 16)


def test_a_large_echo_through_a_tunnel_keeps_memory_bounded(env):
    """200 MiB each way through an upgraded connection: flow control, not buffering, keeps the proxy small."""
    n = 200 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", env["echo"].inbound), timeout=PATIENCE_S) as s:
        s.sendall(UPGRADE)
        _read_until(s, b"SERVER-FIRST")
        before = rss_kb(env["echo"].proc.pid)
        block = b"z" * (1 << 20)
        sent = got = 0
        s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        peak = 0
        while got < n:
            for _, mask in sel.select(timeout=PATIENCE_S):
                if mask & selectors.EVENT_WRITE and sent < n:
                    try:
                        sent += s.send(block[:min(len(block), n - sent)])
                    except BlockingIOError:
                        pass
                    if sent >= n:
                        sel.modify(s, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    got += len(s.recv(1 << 20))
            peak = max(peak, rss_kb(env["echo"].proc.pid) - before)
        sel.close()
    assert got == n
    assert peak < 50_000, f"the proxy grew {peak} KiB"
    assert env["echo"].alive() and env["ws"].alive()


def test_connect_through_the_outbound_sidecar(env):
    target = b"127.0.0.1:%d" % env["raw"].port
    with socket.create_connection(("127.0.0.1", env["echo"].outbound), timeout=PATIENCE_S) as s:
        port = s.getsockname()[1]
        s.sendall(b"CONNECT %b HTTP/1.1\r\nHost: %b\r\n\r\n\x00early" % (target, target))
        assert _read_until(s, b"\x00early") == b"HTTP/1.1 200 Connection Established\r\n\r\n\x00early"
        s.sendall(b"\x00more")
        _read_until(s, b"\x00more")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""
    (call,) = _calls(env, port)
    assert (call["observer"], call["method"], call["authority"], call["status"], call["error"]) == \
        ("client", "CONNECT", target.decode(), 200, "")
    assert (call["request_bytes"], call["response_bytes"]) == (11, 11)


def test_connect_refused_and_where_it_is_not_served(env):
    dead = free_port()
    out = exchange(env["echo"].outbound, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % dead)
    # answered as any request's refused upstream is (proxy/connect.py): 503, Envoy's UF
    assert out.startswith(b"HTTP/1.1 503 ") and b"connection: close" in out
    assert out.endswith(b"upstream connect error: connection refused\n")
    out = exchange(env["echo"].inbound, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % dead)
    assert out.startswith(b"HTTP/1.1 405 ")


def test_no_errors_logged(env):
    for name in ("ws", "echo"):
        log = env[name].log.read_text()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]

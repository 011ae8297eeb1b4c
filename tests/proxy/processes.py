"""Real programs for the proxy tests: the proxy subprocess and an aiohttp sample upstream in a thread."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

from aiohttp import web

from tests.app_thread import AppThread
from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

READY = re.compile(r"meshlens proxy ready service=(\S+) (.*)")


class ProxyProcess(ServerProcess):
    """`meshlens proxy` on ephemeral ports; stopped (SIGTERM, then kill) by the test."""

    name = "proxy"

    def __init__(self, workdir: Path, mesh: str | None, service: str, *args: str, control: str | None = None) -> None:
        """`mesh`: the mesh file's text; or None with `control`, the control plane's URL (its last snapshot
        kept in `snapshot_file`)."""
        super().__init__(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh_file = self.workdir / "mesh.yaml"
        self.snapshot_file = self.workdir / "snapshot.json"
        if mesh is not None:
            self.mesh_file.write_text(mesh)
        self.source = (["--mesh", str(self.mesh_file)] if control is None else
                       ["--control", control, "--snapshot-cache", str(self.snapshot_file)])
        self.service = service
        self.args = list(args)
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = PATIENCE_S) -> "ProxyProcess":
        m = self.launch(["meshlens.cli.main", "proxy", "--service", self.service, *self.source,
                         "--inbound-port", "0", "--outbound-port", "0", "--admin-port", "0", "--metrics-port", "0",
                         *self.args], READY, timeout)
        self.ports = {k: int(v.rsplit(":", 1)[1]) for k, v in (f.split("=") for f in m.group(2).split())}
        return self

    def __enter__(self) -> "ProxyProcess":
        return self  # started already: `with ProxyProcess(...).start() as p:`

    @property
    def inbound(self) -> int:
        return self.ports["inbound"]

    @property
    def outbound(self) -> int:
        return self.ports["outbound"]


class Gate:
    """GET /hold on the sample app: `arrived` is set when such a request reaches the app, which answers it
    once the test sets `released`. An in-flight request for as long as a test needs, with no clock."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.released = threading.Event()


def sample_app(gate: Gate | None = None) -> web.Application:
    """The sample upstream service: echo, fixed, chunked, reset, headers, sized bodies, a held request."""
    gate = gate or Gate()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello\n", headers={"X-Sample": "1", "Cache-Control": "no-cache"})

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(body=body, headers={"X-Body-Sha": hashlib.sha256(body).hexdigest()})

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if request.version >= (1, 1):  # RFC 9112 7.1: no Transfer-Encoding to an HTTP/1.0 request
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(b"chunk %d\n" % i)
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "1000000"))
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp  # aiohttp would send what a streaming handler writes, even to HEAD
        block = b"x" * 65536
        while n > 0:
            await resp.write(block[:min(n, len(block))])
            n -= min(n, len(block))
        return resp

    async def reset(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"y" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, body=None if code in (204, 304) else b"status body\n")

    async def sink(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.json_response({"bytes": n})

    async def slowsink(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
            await asyncio.sleep(0.002)  # a slow upstream: the proxy must stop reading the client
        return web.json_response({"bytes": n})

    async def hold(request: web.Request) -> web.Response:
        gate.arrived.set()
        while not gate.released.is_set():
            await asyncio.sleep(0.01)
        return web.Response(text="released\n")

    app = web.Application(client_max_size=1 << 31)
    app.router.add_get("/hold", hold)
    app.router.add_route("*", "/hello", hello)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/headers", headers)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/reset", reset)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/sink", sink)
    app.router.add_post("/slowsink", slowsink)
    return app


class SampleService(AppThread):
    """The sample app on an ephemeral port, in its own thread and loop; `gate` holds its GET /hold."""

    def __init__(self) -> None:
        self.gate = Gate()
        super().__init__(lambda: sample_app(self.gate))


def mesh_yaml(upstream_port: int, dead_port: int) -> str:
    return json.dumps({"services": {
        "web": {"instances": []},
        "backend": {"instances": [f"127.0.0.1:{upstream_port}"]},
        "dead": {"instances": [f"127.0.0.1:{dead_port}"]},
    }})


# -- upstreams that are not plain HTTP: raw echo (with an HTTP Upgrade), TLS echo, WebSocket echo ----------


class LoopThread:
    """An asyncio loop in a daemon thread, for servers the tests run in-process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _Echo(asyncio.Protocol):
    """Echoes bytes; `RESET` in them resets the connection. A connection opening with `GET `
    is HTTP first: /upgrade answers 101 (then `SERVER-FIRST`, then echo), /refuse 426, /ok 200."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buf = b""
        self.mode = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.mode == "echo":
            self._echo(data)
            return
        self.buf += data
        if not self.mode and len(self.buf) >= 4:
            self.mode = "http" if self.buf.startswith(b"GET ") else "echo"
            if self.mode == "echo":
                data, self.buf = self.buf, b""
                self._echo(data)
                return
        while self.mode == "http" and b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.seen.append(head)
            path = head.split(b" ")[1]
            upgrade = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")[1:] if ln.lower().startswith(b"upgrade:")]
            if path == b"/upgrade":
                self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %b\r\nConnection: Upgrade\r\n"
                             b"X-Seen-Upgrade: %b\r\n\r\nSERVER-FIRST" % (upgrade[0] if upgrade else b"-", b",".join(upgrade) or b"-"))
                self.mode = "echo"
                rest, self.buf = self.buf, b""
                if rest:
                    self._echo(rest)
            elif path == b"/refuse":
                self.t.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
            else:
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen-Upgrade: %b\r\n\r\nok" % (b",".join(upgrade) or b"-"))

    def _echo(self, data: bytes) -> None:
        if b"RESET" in data:
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            self.t.abort()
            return
        self.t.write(data)

    def eof_received(self) -> bool | None:
        if self.mode != "http" and self.buf:  # fewer than 4 bytes, ever: still echoed
            self._echo(self.buf)
        self.t.close()  # the client is done: what was echoed is flushed, then FIN
        return True


class EchoService(LoopThread):
    """`_Echo` on an ephemeral port, optionally over TLS (`tls`: (certfile, keyfile)); `sni` lists the names seen."""

    def __init__(self, tls: tuple[Path, Path] | None = None, alpn: list[str] | None = None) -> None:
        super().__init__()
        self.heads: list[bytes] = []
        self.sni: list[str | None] = []
        ctx = None
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*tls)
            ctx.set_alpn_protocols(alpn or ["http/1.1"])
            ctx.sni_callback = lambda sslobj, name, _ctx: self.sni.append(name)
        self.server = self.run(self.loop.create_server(lambda: _Echo(self.heads), "127.0.0.1", 0, ssl=ctx))
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.close()
        super().stop()


def self_signed_cert(workdir: Path, name: str) -> tuple[Path, Path]:
    """A throwaway certificate for `name` (openssl req), as (certfile, keyfile)."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def ws_app() -> web.Application:
    """WebSocket echo at /ws (text and bytes; `close` from the client ends it)."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == web.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    return app


class WsService(LoopThread):
    """`ws_app` on an ephemeral port."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = web.AppRunner(ws_app(), access_log=None)
        self.run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.run(site.start())
        self.port = self.runner.addresses[0][1]

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        super().stop()


CALL_COLUMNS = ("observer", "src_service", "dst_service", "dst_port", "protocol", "method", "path", "authority",
                "status", "request_bytes", "response_bytes", "error", "tls", "duration_ns", "attributes")


def rss_kb(pid: int) -> int:
    """A process's resident memory now, KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def recorded_calls(query_url: str, where: str, n: int = 1, timeout: float = PATIENCE_S,
                   columns: tuple[str, ...] = CALL_COLUMNS) -> list[dict]:
    """Rows of meshlens.calls matching `where` (SQL), once at least `n` arrived (or the timeout passed)."""
    from meshlens.collector.stores import connect

    store = connect(query_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = store.query_rows(f"SELECT {', '.join(columns)} FROM meshlens.calls WHERE {where} ORDER BY time")
            if len(rows) >= n or time.monotonic() > deadline:
                return [dict(zip(columns, r)) for r in rows]
            time.sleep(0.3)
    finally:
        store.close()

"""Real programs for the proxy tests: the proxy subprocess and an aiohttp sample upstream in a thread."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from pathlib import Path

from aiohttp import web

from tests.server_process import ServerProcess

READY = re.compile(r"meshlens proxy ready service=(\S+) (.*)")


class ProxyProcess(ServerProcess):
    """`meshlens proxy` on ephemeral ports; stopped (SIGTERM, then kill) by the test."""

    name = "proxy"

    def __init__(self, workdir: Path, mesh: str, service: str, *args: str) -> None:
        super().__init__(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh_file = self.workdir / "mesh.yaml"
        self.mesh_file.write_text(mesh)
        self.service = service
        self.args = list(args)
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        m = self.launch(["meshlens.cli.main", "proxy", "--service", self.service, "--mesh", str(self.mesh_file),
                         "--inbound-port", "0", "--outbound-port", "0", "--admin-port", "0", "--metrics-port", "0",
                         *self.args], READY, timeout)
        self.ports = {k: int(v.rsplit(":", 1)[1]) for k, v in (f.split("=") for f in m.group(2).split())}
        return self

    @property
    def inbound(self) -> int:
        return self.ports["inbound"]

    @property
    def outbound(self) -> int:
        return self.ports["outbound"]


def sample_app() -> web.Application:
    """The sample upstream service: echo, fixed, chunked, reset, headers, sized bodies."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello\n", headers={"X-Sample": "1", "Cache-Control": "no-cache"})

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(body=body, headers={"X-Body-Sha": hashlib.sha256(body).hexdigest()})

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
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

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="slept\n")

    app = web.Application(client_max_size=1 << 31)
    app.router.add_get("/sleep", sleep)
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


class SampleService:
    """The sample app on an ephemeral port, in its own thread and loop."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> "SampleService":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(sample_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def mesh_yaml(upstream_port: int, dead_port: int) -> str:
    return json.dumps({"services": {
        "web": {"instances": []},
        "backend": {"instances": [f"127.0.0.1:{upstream_port}"]},
        "dead": {"instances": [f"127.0.0.1:{dead_port}"]},
    }})

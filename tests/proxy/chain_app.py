"""A service of the chain tests (A -> B -> C): an aiohttp app that, on GET /call, calls the next service
(if any) and answers with what it saw. It copies the incoming `traceparent` onto its outgoing request,
as an instrumented application would, and knows nothing of sidecars beyond an optional forward proxy.

    python -m tests.proxy.chain_app --name b --port 8080 [--host 0.0.0.0] [--next URL] [--proxy URL]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from tests.netns import InNamespace
from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

READY = re.compile(r"chain app ready name=(\S+) port=(\d+)")


class ChainApp(InNamespace, ServerProcess):
    """One chain service as a subprocess (in a namespace when `netns` is set)."""

    name = "app"

    def __init__(self, workdir: Path, service: str, port: int = 0, host: str = "127.0.0.1",
                 next_url: str | None = None, proxy: str | None = None, netns: str | None = None) -> None:
        super().__init__(workdir)
        self.service, self.host, self.port = service, host, port
        self.next_url, self.proxy, self.netns = next_url, proxy, netns

    def start(self, timeout: float = PATIENCE_S) -> "ChainApp":
        args = ["tests.proxy.chain_app", "--name", self.service, "--host", self.host, "--port", str(self.port)]
        if self.next_url:
            args += ["--next", self.next_url]
        if self.proxy:
            args += ["--proxy", self.proxy]
        self.port = int(self.launch(args, READY, timeout).group(2))
        return self


def main() -> None:
    import asyncio
    import signal

    from aiohttp import ClientSession, ClientTimeout, web

    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--next", dest="next_url")
    p.add_argument("--proxy")
    a = p.parse_args()

    async def call(request: web.Request) -> web.Response:
        seen = {"service": a.name, "traceparent": request.headers.get("traceparent"),
                "peer_field": request.headers.get("x-meshlens-peer")}
        if a.next_url:
            headers = {"traceparent": request.headers["traceparent"]} if "traceparent" in request.headers else {}
            async with session.get(a.next_url, headers=headers, proxy=a.proxy) as r:
                seen["next_status"] = r.status
                seen["next"] = await r.json() if r.status == 200 else await r.text()
        return web.json_response(seen)

    async def serve() -> None:
        nonlocal session
        session = ClientSession(timeout=ClientTimeout(total=PATIENCE_S))
        app = web.Application()
        app.router.add_get("/call", call)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.host, a.port).start()
        print(f"chain app ready name={a.name} port={runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    session: ClientSession = None  # type: ignore[assignment]
    asyncio.run(serve())


if __name__ == "__main__":
    main()

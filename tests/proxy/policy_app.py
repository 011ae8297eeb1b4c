"""One instance of a service for policy tests: says who it is, fails on demand, holds requests, counts them."""
from __future__ import annotations

import asyncio
import threading
from collections import Counter

from aiohttp import web

from tests.app_thread import AppThread


class Instance(AppThread):
    """Every path answers `status` with its name as the body, except /hold, held until `release()`.

    `arrived` counts requests (by path), `per_connection` requests a TCP connection carried."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.arrived: Counter[str] = Counter()
        self.per_connection: Counter[tuple] = Counter()
        """By the caller's address (its port stays in TIME_WAIT after the caller closes: never one reused)."""
        self.hosts: list[str] = []
        self.bodies: list[bytes] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        super().__init__(self._app)

    def release(self) -> None:
        self._released.set()

    def held(self) -> int:
        with self._lock:
            return self.arrived["/hold"]

    def _app(self) -> web.Application:
        async def any_path(request: web.Request) -> web.Response:
            body = await request.read()
            with self._lock:
                self.hosts.append(request.headers.get("Host", ""))
                self.bodies.append(body)
                self.arrived[request.path] += 1
                self.per_connection[request.transport.get_extra_info("peername")] += 1  # type: ignore[union-attr]
            if request.path == "/hold":
                await asyncio.get_running_loop().run_in_executor(None, self._released.wait, 60)
            return web.Response(status=self.status, text=self.name)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        return app

"""An aiohttp application served in-process for a test: its own loop and thread, an ephemeral loopback port."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from aiohttp import web


class AppThread:
    """`start()` serves `make_app()` on 127.0.0.1:`port`; `stop()` closes it and its loop."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self.port = 0
        self._make_app = make_app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):  # type: ignore[no-untyped-def]  # returns self, typed by each subclass' use
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._make_app(), access_log=None)
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

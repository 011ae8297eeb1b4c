"""`meshlens control`, the process: open the store, serve the API, stop on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys

from aiohttp import web

from meshlens.control.api import build_app
from meshlens.control.store import Store

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "loopback", "run"]

log = logging.getLogger("meshlens.control")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 15010  # Istio's control-plane (istiod) port


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(store: Store, host: str, port: int) -> None:
    # handler_cancellation: a long poll whose sidecar went away ends with it, not at its timeout
    runner = web.AppRunner(build_app(store), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"meshlens control ready listen={host}:{bound} store={store.url} revision={await store.revision()}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    store.release_waiters()  # long polls answer now (nothing changed), so that stopping does not wait for them
    await runner.cleanup()
    await store.close()
    print("meshlens control stopped", file=sys.stderr, flush=True)


def run(store: Store, host: str, port: int) -> None:
    asyncio.run(serve(store, host, port))

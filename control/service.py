"""`meshlens control`, the process: open the store, serve the API, ship the audit trail to a collector when
given one (control/changes.py), stop on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys

from aiohttp import web

from meshlens.control.api import build_app
from meshlens.control.auth import Tokens
from meshlens.control.ca import CA
from meshlens.control.changes import ChangeShipper
from meshlens.control.store import Store

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "run", "server_tls"]

log = logging.getLogger("meshlens.control")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 15010  # Istio's control-plane (istiod) port


async def serve(store: Store, host: str, port: int, tokens: Tokens | None = None,
                tls: ssl.SSLContext | None = None, collector: str | None = None, ca: CA | None = None,
                calls_store: str | None = None) -> None:
    """Serve until signalled; with `collector` (a URL control/changes.py's changes_url takes), ship every change
    there too."""
    await store.open()  # an etcd cluster nobody answers for is said now, not at the first request
    # handler_cancellation: a long poll whose sidecar went away ends with it, not at its timeout
    runner = web.AppRunner(build_app(store, tokens, ca, calls_store), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    shipper = None
    if collector:
        # Which replica shipped a row: as an operator names it.
        shipper = ChangeShipper(store, collector, f"{socket.gethostname()}:{bound}")
        shipper.start()
    print(f"meshlens control ready listen={host}:{bound} store={store.url} revision={await store.revision()} "
          f"tls={'on' if tls else 'off'} tokens={len(tokens) if tokens else 'off'} "
          f"collector={shipper.url if shipper else 'off'} ca={ca.trust_domain if ca else 'off'} "
          f"console={'https' if tls else 'http'}://{_url_host(host)}:{bound}/console/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    store.release_waiters()  # long polls answer now (nothing changed), so that stopping does not wait for them
    if shipper is not None:
        await shipper.stop()  # before the store closes: it writes where shipping stands
    await runner.cleanup()
    await store.close()
    print("meshlens control stopped", file=sys.stderr, flush=True)


def run(store: Store, host: str, port: int, tokens: Tokens | None = None, tls: ssl.SSLContext | None = None,
        collector: str | None = None, ca: CA | None = None, calls_store: str | None = None) -> None:
    asyncio.run(serve(store, host, port, tokens, tls, collector, ca, calls_store))


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The API's TLS context from a PEM certificate (chain) and key; ValueError in one line."""
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ValueError(f"cannot read {path}: no such file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot use certificate {cert} with key {key}: {getattr(e, 'reason', None) or e}") from None
    return ctx


def _url_host(host: str) -> str:
    """The listen address as a URL's host: an IPv6 address in brackets, a wildcard as loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host

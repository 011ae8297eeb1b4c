"""`meshlens collector`: open the store and spool, then serve ingest, OTLP/gRPC and queries until signalled
(and forward accepted spans when --forward-otlp says where)."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from dataclasses import dataclass

from aiohttp import web

from meshlens.collector.config import CollectorConfig
from meshlens.collector.forward import Forwarder
from meshlens.collector.grpc_ingest import start_grpc
from meshlens.collector.http_ingest import make_ingest_app
from meshlens.collector.ingest import BatchPolicy, Ingest
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.schema import Layout, Retention, migrate
from meshlens.collector.spool import Spool
from meshlens.collector.stores import Store, StoreError, connect, redact
from meshlens.collector.stores.embedded import EmbeddedStore

log = logging.getLogger("meshlens.collector")


class StartupError(Exception):
    """The collector cannot start (bad store, unreachable store, unwritable directory)."""


@dataclass
class Opened:
    store: Store
    spool: Spool
    ingest: Ingest
    forward: Forwarder | None


def open_store(url: str, retention: Retention) -> Store:
    """Connect, refuse a too-old server, and bring the schema up to date."""
    try:
        store = connect(url)
    except ValueError as e:
        raise StartupError(str(e)) from None
    except StoreError as e:
        raise StartupError(f"cannot open store {redact(url)}: {e}") from None
    try:
        store.check_version()
        migrate(store, Layout(store.database, store.cluster, retention))
    except StoreError as e:
        store.close()
        raise StartupError(str(e) if "too old" in str(e) else f"store {redact(url)}: {e}") from None
    return store


def open_collector(cfg: CollectorConfig) -> Opened:
    retention = Retention(cfg.calls_retention_days, cfg.traces_retention_days, cfg.changes_retention_days)
    try:
        spool = Spool(cfg.spool_dir, cfg.spool_max_bytes)
    except OSError as e:
        raise StartupError(f"cannot use spool directory {cfg.spool_dir}: {e.strerror or e}") from None
    store = open_store(cfg.store, retention)
    policy = BatchPolicy(cfg.batch_rows, cfg.flush_interval, cfg.max_backlog_bytes)
    metrics = CollectorMetrics()
    forward = Forwarder(cfg.forward_otlp, metrics, cfg.forward_queue_spans, cfg.forward_timeout) \
        if cfg.forward_otlp else None
    ingest = Ingest(store, spool, store.database, metrics, policy, forward)
    return Opened(store, spool, ingest, forward)


async def serve(cfg: CollectorConfig, opened: Opened) -> None:
    """Serve until SIGTERM/SIGINT, then stop listening, drain the spool and close."""
    ingest, forward = opened.ingest, opened.forward
    ingest.start()
    if forward is not None:
        forward.start()
    # auto_decompress off: the ingest app undoes gzip itself, with a size bound.
    runner = web.AppRunner(make_ingest_app(ingest, cfg.max_body_bytes), access_log=None, auto_decompress=False)
    await runner.setup()
    sites = [web.TCPSite(runner, cfg.host, cfg.otlp_http_port, reuse_address=True)]
    query_runner = None
    if isinstance(opened.store, EmbeddedStore) and cfg.query_port >= 0:
        from meshlens.collector.query_http import make_query_app

        query_app = make_query_app(opened.store, user=cfg.query_user, password=cfg.query_password,
                                   max_concurrent_queries=cfg.query_max_concurrent)
        query_runner = web.AppRunner(query_app, access_log=None)
        await query_runner.setup()
        sites.append(web.TCPSite(query_runner, cfg.query_host, cfg.query_port, reuse_address=True))
    try:
        for site in sites:
            await site.start()
        grpc_server, grpc_port = start_grpc(ingest, cfg.host, cfg.otlp_grpc_port)
    except OSError as e:
        await runner.cleanup()
        if query_runner:
            await query_runner.cleanup()
        ingest.stop(drain_timeout=0)
        if forward is not None:
            forward.stop(drain=0)
        raise StartupError(f"cannot listen: {e.strerror or e}") from None

    ports = [s._server.sockets[0].getsockname()[1] for s in sites]  # type: ignore[union-attr]
    ready = f"otlp_http={cfg.host}:{ports[0]} otlp_grpc={cfg.host}:{grpc_port}"
    if query_runner:
        ready += f" query=http://{cfg.query_host}:{ports[1]}/"
    forwarding = redact(forward.url) if forward is not None else "off"
    print(f"meshlens collector ready {ready} store={redact(opened.store.url)} spool={cfg.spool_dir} "
          f"forward={forwarding}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new requests, draining spool")
    grpc_server.stop(grace=5).wait()
    await runner.cleanup()
    if query_runner:
        await query_runner.cleanup()
    # Both drains at once: the spool into the store, the forward queue to its endpoint (bounded, shorter).
    drains = [loop.run_in_executor(None, ingest.stop)]
    if forward is not None:
        drains.append(loop.run_in_executor(None, forward.stop))
    await asyncio.gather(*drains)
    opened.store.close()
    print("meshlens collector stopped", file=sys.stderr, flush=True)


def run(cfg: CollectorConfig) -> None:
    opened = open_collector(cfg)
    # Decoding allocates millions of short-lived tuples and no cycles: move what
    # start-up built out of the collector's way and run generation 0 less often.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg, opened))
    else:
        uvloop.run(serve(cfg, opened))

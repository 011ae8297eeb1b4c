"""The demo's callers: shoppers through the ingress sidecar, and a legacy reports job with no sidecar.

    python -m meshlens.demo.load shoppers --outbound http://127.0.0.1:P --rate 40
        an open-loop arrival process: two thirds checkouts, one third product pages,
        sent to frontend through the ingress sidecar; at most MAX_IN_FLIGHT at once
    python -m meshlens.demo.load reports --target http://127.0.0.1:P --peer catalog --collector URL
        GET /items/{id} straight to catalog's inbound port, plaintext, no sidecar of its own,
        a new connection each (as a batch job's client opens them): the caller that mTLS
        readiness must name before STRICT can be turned on

The faults themselves live in the services (meshlens.demo.shop); the load only
has to be steady enough that every one of them reaches the analysis' sample
minimums within a minute.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from collections import Counter

import aiohttp
from yarl import URL

# Bound on concurrent requests: a slow tail must not turn into unbounded tasks.
MAX_IN_FLIGHT = 64
CHECKOUT_SHARE = 2 / 3
ITEMS = 500        # product ids: many, so routes are templated as /items/{id}
SKUS = 200
REPORTS_RATE = 2.0  # requests/s of the reports job
REQUEST_TIMEOUT_S = 10.0


class Load:
    """Counts what was sent and how it ended, for the summary line on exit."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.in_flight = 0

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))


async def _send(load: Load, session: aiohttp.ClientSession, method: str, url: str, **kw: object) -> None:
    load.in_flight += 1
    try:
        async with session.request(method, url, **kw) as resp:  # type: ignore[arg-type]
            await resp.read()
            load.outcomes[f"status_{resp.status}"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError):
        load.outcomes["failed"] += 1
    finally:
        load.in_flight -= 1


async def arrivals(rate: float, stop: asyncio.Event, rng: random.Random):
    """Poisson arrivals at `rate` per second until `stop` is set."""
    loop = asyncio.get_running_loop()
    nxt = loop.time()
    while not stop.is_set():
        nxt += rng.expovariate(rate)
        delay = nxt - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass
        yield


async def shoppers(args: argparse.Namespace, stop: asyncio.Event, load: Load) -> None:
    rng = random.Random()
    tasks: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async for _ in arrivals(args.rate, stop, rng):
            if load.in_flight >= MAX_IN_FLIGHT:
                load.outcomes["skipped_busy"] += 1
                continue
            if rng.random() < CHECKOUT_SHARE:
                order = {"user": rng.randrange(1, 10_000), "sku": rng.randrange(1, SKUS),
                         "amount": rng.randrange(5, 300)}
                coro = _send(load, session, "POST", "http://frontend/checkout", json=order, proxy=args.outbound)
            else:
                coro = _send(load, session, "GET", f"http://frontend/products/{rng.randrange(1, ITEMS)}",
                             proxy=args.outbound)
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S)


async def reports(args: argparse.Namespace, stop: asyncio.Event, load: Load) -> None:
    from meshlens.demo.telemetry import client_trace_config, tracer_provider

    rng = random.Random()
    provider = tracer_provider("reports", "reports", args.collector)
    target = URL(args.target)

    def peer_of(host: str, port: int) -> str:
        return args.peer if (host, port) == (target.host, target.port) else ""

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # A sidecar decides what STRICT does to a connection when it opens: on a connection of its own each call meets
    # the PeerAuthentication in force when it is made (noted would_refuse_plaintext in dry-run, refused enforced).
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     trace_configs=[client_trace_config(provider, peer_of)]) as s:
        async for _ in arrivals(REPORTS_RATE, stop, rng):
            await _send(load, s, "GET", f"{args.target.rstrip('/')}/items/{rng.randrange(1, ITEMS)}")
    provider.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meshlens.demo.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("shoppers")
    s.add_argument("--outbound", required=True, help="the ingress sidecar's outbound listener")
    s.add_argument("--rate", type=float, required=True, help="requests per second to frontend")
    r = sub.add_parser("reports")
    r.add_argument("--target", required=True, help="the callee's inbound listener, http://127.0.0.1:PORT")
    r.add_argument("--peer", required=True, help="the callee's service name, for the client spans")
    r.add_argument("--collector", required=True, help="collector base URL for OTLP/HTTP")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> Load:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = Load()
    print(f"meshlens demo load ready role={args.role}", flush=True)
    await (shoppers if args.role == "shoppers" else reports)(args, stop, load)
    return load


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = asyncio.run(amain(args))
    print(f"meshlens demo load done role={args.role} {load.summary()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo shop's services, one instance per process, each next to its own sidecar.

    frontend  GET /products/{id}  -> catalog GET /items/{id} and GET /items/{id}/reviews
              POST /checkout      -> cart POST /cart/checkout
    cart      POST /cart/checkout -> inventory GET /stock/{sku}, then payment POST /charge
    catalog   GET /items/{id}; GET /items/{id}/reviews always answers 503 (its backend is gone)
    payment   POST /charge; --slow-share of calls take --slow-seconds (the slow tail)
    inventory GET /stock/{sku}; --error-share of calls answer 503, in runs of --error-run on average (a flaky
              instance: its stock database stalls now and then)

Calls to other services go through the sidecar's outbound listener as an HTTP
forward proxy (`http://catalog/items/7` via --outbound). Run as
`python -m meshlens.demo.shop --service NAME --instance ID --port P --outbound URL --collector URL`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys

import aiohttp
from aiohttp import web

from meshlens.demo.telemetry import client_address, client_trace_config, instrument_server, tracer_provider

SERVICES: tuple[str, ...] = ("frontend", "catalog", "cart", "payment", "inventory")
# Ordinary work per request, so latency has a body and a tail to compare against (seconds).
WORK_S = {"frontend": (0.001, 0.004), "catalog": (0.002, 0.008), "cart": (0.001, 0.003),
          "payment": (0.005, 0.020), "inventory": (0.001, 0.005)}
# A caller gives up on a callee after this long: far above the slow tail, so the demo shows the tail.
CALL_TIMEOUT_S = 10.0


class Shop:
    """One instance: its service name, faults, and the session it calls other services with."""

    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession | None) -> None:
        self.args = args
        self.session = session
        self.rng = random.Random()
        self.failing = False
        """inventory: whether the last call answered 503 (failures come in runs)."""

    async def work(self) -> None:
        lo, hi = WORK_S[self.args.service]
        await asyncio.sleep(self.rng.uniform(lo, hi))

    async def call(self, method: str, service: str, path: str, **kw: object) -> tuple[int, object]:
        """(status, JSON body or None) of a call through the sidecar; 599 when the call itself failed."""
        assert self.session is not None
        try:
            async with self.session.request(method, f"http://{service}{path}", proxy=self.args.outbound,
                                            **kw) as resp:  # type: ignore[arg-type]
                body = await resp.json() if resp.content_type == "application/json" else None
                return resp.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 599, None

    # -- frontend ---------------------------------------------------------------------------

    async def product(self, request: web.Request) -> web.Response:
        item_id = request.match_info["id"]
        await self.work()
        (status, item), (r_status, reviews) = await asyncio.gather(
            self.call("GET", "catalog", f"/items/{item_id}"), self.call("GET", "catalog", f"/items/{item_id}/reviews"))
        if status != 200:
            return web.json_response({"error": "catalog unavailable"}, status=502 if status >= 500 else status)
        # The page degrades gracefully without reviews, as shops do.
        return web.json_response({"item": item, "reviews": reviews if r_status == 200 else None})

    async def checkout(self, request: web.Request) -> web.Response:
        order = await request.json()
        await self.work()
        status, body = await self.call("POST", "cart", "/cart/checkout", json=order)
        return web.json_response(body, status=min(status, 503))

    # -- cart --------------------------------------------------------------------------------

    async def cart_checkout(self, request: web.Request) -> web.Response:
        order = await request.json()
        await self.work()
        status, _ = await self.call("GET", "inventory", f"/stock/{int(order['sku'])}")
        if status != 200:
            return web.json_response({"error": "inventory unavailable"}, status=503)
        status, paid = await self.call("POST", "payment", "/charge", json={"amount": order.get("amount", 1)})
        if status != 200:
            return web.json_response({"error": "payment failed"}, status=502)
        return web.json_response({"order": "accepted", "payment": paid})

    # -- catalog, payment, inventory ---------------------------------------------------------

    async def item(self, request: web.Request) -> web.Response:
        await self.work()
        item_id = int(request.match_info["id"])
        return web.json_response({"id": item_id, "name": f"item {item_id}", "price": 1 + item_id % 50})

    async def reviews(self, request: web.Request) -> web.Response:
        await self.work()
        return web.json_response({"error": "reviews backend unavailable"}, status=503)

    async def charge(self, request: web.Request) -> web.Response:
        await request.read()
        if self.rng.random() < self.args.slow_share:
            await asyncio.sleep(self.rng.uniform(*self.args.slow_seconds))
        else:
            await self.work()
        return web.json_response({"charged": True})

    async def stock(self, request: web.Request) -> web.Response:
        await self.work()
        again, start = fail_chances(self.args.error_share, self.args.error_run)
        self.failing = self.rng.random() < (again if self.failing else start)
        if self.failing:
            return web.json_response({"error": "stock database busy"}, status=503)
        return web.json_response({"sku": int(request.match_info["id"]), "available": True})

    def routes(self) -> list[web.RouteDef]:
        table: dict[str, list[web.RouteDef]] = {
            "frontend": [web.get("/products/{id}", self.product), web.post("/checkout", self.checkout)],
            "cart": [web.post("/cart/checkout", self.cart_checkout)],
            "catalog": [web.get("/items/{id}", self.item), web.get("/items/{id}/reviews", self.reviews)],
            "payment": [web.post("/charge", self.charge)],
            "inventory": [web.get("/stock/{id}", self.stock)],
        }
        return table[self.args.service]


def fail_chances(share: float, run: float | None) -> tuple[float, float]:
    """(P(fail | the last call failed), P(fail | it did not)): failures `share` of the calls, independent (`run`
    None), else in runs of `run` calls on average (a two-state chain). Outlier detection ejects on consecutive
    failures: runs are what it sees of an instance going bad, where independent failures rarely line up."""
    if run is None or share >= 1:
        return share, share
    again = 1 - 1 / run
    return again, min(1.0, share * (1 - again) / (1 - share))


def _seconds_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share is 0..1, got {text}")
    return value


def _run(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"a run is 1 call or more on average, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meshlens.demo.shop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", required=True, choices=SERVICES)
    p.add_argument("--instance", help="instance name (default: the service name)")
    p.add_argument("--port", type=int, required=True, help="port to listen on, on 127.0.0.1")
    p.add_argument("--outbound", help="the sidecar's outbound listener, http://127.0.0.1:PORT")
    p.add_argument("--collector", required=True, help="collector base URL for OTLP/HTTP, http://host:port")
    p.add_argument("--slow-share", type=_share, default=0.0, help="payment: share of calls in the slow tail")
    p.add_argument("--slow-seconds", type=_seconds_range, default=(0.8, 1.5), help="payment: MIN,MAX of the tail")
    p.add_argument("--error-share", type=_share, default=0.0, help="inventory: share of calls answered 503")
    p.add_argument("--error-run", type=_run, default=None,
                   help="inventory: calls a run of failures lasts on average (default: failures independent)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    instance = args.instance or args.service
    provider = tracer_provider(args.service, instance, args.collector)
    session = None
    if args.service in ("frontend", "cart"):
        if not args.outbound:
            raise SystemExit(f"shop: --outbound is required for {args.service}")
        session = aiohttp.ClientSession(trace_configs=[client_trace_config(provider)],
                                        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
    shop = Shop(args, session)
    instrument_server(provider)
    app = web.Application(middlewares=[client_address])  # after the tracing middleware the instrumentor inserts
    app.add_routes(shop.routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"meshlens demo shop ready service={args.service} instance={instance} port={args.port}", flush=True)
    await stop.wait()
    await runner.cleanup()
    if session is not None:
        await session.close()
    provider.shutdown()  # exports the spans still buffered


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

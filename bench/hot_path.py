"""The sidecar's own Python per exchange, without sockets: what the hot path costs before the kernel does.

Run: .venv/bin/python bench/hot_path.py [--exchanges 10000] [--repeat 7] [--connections 1]
         [--policies observe|dry-run|enforce]

A real `Proxy`, `Downstream` and `Upstream` (observe mode, recording off) over fake
transports whose writes go nowhere: a keep-alive GET as wrk sends it, and nginx's
answer to it, fed to the two shells, one exchange after another. Reference in the same
run: the same two messages through bare httptools parsers with empty callbacks (the
floor any httptools-based proxy pays). Prints µs per exchange (best of --repeat, the
machine is shared) and, counted with sys.settrace, Python bytecodes and calls per
exchange: a deterministic measure of the same work, for before/after comparisons that
the shared machine's noise would hide. With --connections N, N client connections
(each with its own upstream connection) take turns, as wrk's connections do. With
--policies MODE, the exchange is an outbound call to payment-service with the issue's
example applied from a control-plane snapshot (its VirtualService's header match and
90/10 split, its DestinationRule's pool and outlier detection; without
maxRequestsPerConnection, which would make every other exchange open a connection)
and payment-service in MODE: what the policy chain costs an exchange, against observe.
Reported, not asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlens.mesh import parse  # noqa: E402
from meshlens.proxy.downstream import Downstream  # noqa: E402
from meshlens.proxy.server import Proxy, ProxyConfig  # noqa: E402
from meshlens.proxy.upstream import Upstream  # noqa: E402
from http1 import NoCallbacks  # noqa: E402  (bench/http1.py)

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 02:40:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class FakeTransport:
    """What the shells call on a transport; writes are dropped."""

    def __init__(self) -> None:
        self.peer = ("127.0.0.1", 40000)

    def get_extra_info(self, key: str, default: object = None) -> object:
        return self.peer if key == "peername" else default

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


PAYMENT = {"services": {"bench": {}, "payment-service": {"instances": [
    {"address": "127.0.0.1:9001", "labels": {"version": "v1"}}, {"address": "127.0.0.1:9002", "labels": {"version": "v2"}}]}}}
OUTBOUND_REQUEST = b"GET / HTTP/1.1\r\nHost: payment-service\r\n\r\n"


def example_documents() -> list[dict]:
    import yaml

    from tests.meshlens.policy.test_resources import EXAMPLE

    docs = list(yaml.safe_load_all(EXAMPLE))
    del docs[1]["spec"]["trafficPolicy"]["connectionPool"]["http"]["maxRequestsPerConnection"]
    return docs


def sidecar(connections: int, policies: str | None = None):
    """One exchange's two feeds, as a function, over a proxy with `connections` client connections;
    with `policies`, outbound to payment-service in that mode."""
    mesh = PAYMENT if policies else {"services": {"bench": {"protocol": "http"}}}
    cfg = ProxyConfig(service="bench", mesh=parse(mesh), inbound_port=-1,
                      outbound_port=-1, admin_port=-1, metrics_port=-1, app_port=9)
    proxy = Proxy(cfg, None)
    proxy.loop = asyncio.get_running_loop()
    addrs = [("127.0.0.1", 9)]
    request = REQUEST
    if policies:
        proxy.apply_snapshot({"version": "1", "mesh": mesh, "policies": example_documents(),
                              "modes": {} if policies == "observe" else {"payment-service": policies}})
        addrs, request = [("127.0.0.1", 9001), ("127.0.0.1", 9002)], OUTBOUND_REQUEST
    downs = []
    for _ in range(connections):
        down = Downstream(proxy, not policies)
        down.connection_made(FakeTransport())
        for addr in addrs:
            for _ in range(2):
                up = Upstream(proxy.pool, addr)
                up.connection_made(FakeTransport())
                proxy.pool.release(up)
        downs.append(down)
    turn = itertools.cycle(downs)

    def exchange() -> None:
        down = next(turn)
        down.data_received(request)
        down.queue[0].upstream.data_received(RESPONSE)  # the pooled connection the exchange took

    for _ in range(1000):
        exchange()
    assert proxy.stats["downstream_rq_total"] == 1000 and proxy.stats["downstream_rq_local_reply"] == 0, proxy.stats
    return exchange


def bare():
    req, resp = httptools.HttpRequestParser(NoCallbacks()), httptools.HttpResponseParser(NoCallbacks())

    def exchange() -> None:
        req.feed_data(REQUEST)
        resp.feed_data(RESPONSE)

    return exchange


def best_us(fn, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def count(fn, n: int) -> tuple[float, float, Counter]:
    """(bytecodes, Python calls) per call of fn, and bytecodes by function."""
    per: Counter = Counter()
    totals = [0, 0]

    def tracer(frame, event, arg):
        if event == "call":
            totals[1] += 1
            frame.f_trace_opcodes, frame.f_trace_lines = True, False
        elif event == "opcode":
            totals[0] += 1
            per[frame.f_code.co_qualname] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            fn()
    finally:
        sys.settrace(None)
    return totals[0] / n, totals[1] / n - 1, per  # - 1: fn itself


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exchanges", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--top", type=int, default=12, help="functions listed by bytecodes")
    ap.add_argument("--policies", choices=["observe", "dry-run", "enforce"],
                    help="outbound to payment-service with the issue's example, in this mode")
    args = ap.parse_args()
    ours, floor = sidecar(args.connections, args.policies), bare()
    us, ref = best_us(ours, args.exchanges, args.repeat), best_us(floor, args.exchanges, args.repeat)
    ops, calls, per = count(ours, 200)
    print(f"one exchange through the sidecar's shells, exchange and codec: {us:6.2f} us  ({us / ref:.1f}x bare httptools)")
    print(f"bare httptools, both messages (the floor):                   {ref:6.2f} us")
    print(f"bytecodes {ops:.0f}, Python calls {calls:.1f} per exchange (sys.settrace: deterministic)")
    for name, n in per.most_common(args.top):
        print(f"  {n / 200:6.0f}  {name}")


if __name__ == "__main__":
    asyncio.run(main())

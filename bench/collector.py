"""Collector ingest throughput: OTLP/HTTP protobuf spans end to end, against a raw chdb insert of the same rows.

    .venv/bin/python bench/collector.py [--spans 1000000] [--concurrency 8] [--spans-per-request 512]

Starts a real `meshlens collector` (embedded store, fresh directories), sends
realistic spans (3 services, 10 attributes each, OTLP protobuf as SDK exporters
send them) from a separate process, and measures from the first request until
every span is queryable through the collector's query endpoint. The reference,
measured in the same run: the same rows, already decoded into an Arrow table,
inserted straight into chdb (no HTTP, no decoding, no spool) — the ceiling for
this machine. Also reports the collector's peak RSS, and its RSS under sustained
overload (more producers than it can serve, for --overload-seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402
from opentelemetry.proto.common.v1 import common_pb2  # noqa: E402
from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: E402

from tests.collector_process import CollectorProcess  # noqa: E402

SERVICES = ("frontend", "cart", "payment")
ROUTES = ("/cart/{id}", "/items/{id}", "/checkout", "/pay/{id}")


def make_request(n: int, rng: random.Random) -> bytes:
    """One export request of n spans spread over 3 services, 10 attributes each."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    per = n // len(SERVICES)
    now = time.time_ns()
    for s, service in enumerate(SERVICES):
        rs = req.resource_spans.add()
        for k, v in (("service.name", service), ("service.instance.id", f"{service}-{s}"),
                     ("host.name", "bench-host")):
            rs.resource.attributes.add(key=k, value=common_pb2.AnyValue(string_value=v))
        ss = rs.scope_spans.add()
        ss.scope.name = "bench"
        for _ in range(per if s < len(SERVICES) - 1 else n - per * (len(SERVICES) - 1)):
            route = rng.choice(ROUTES)
            start = now - rng.randrange(10**9)
            sp = ss.spans.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), parent_span_id=rng.randbytes(8),
                              name=f"GET {route}", kind=trace_pb2.Span.SPAN_KIND_SERVER,
                              start_time_unix_nano=start, end_time_unix_nano=start + rng.randrange(10**7))
            attrs = (("http.request.method", "GET"), ("http.route", route), ("url.path", route.replace("{id}", "42")),
                     ("url.scheme", "http"), ("server.address", service), ("network.protocol.version", "1.1"),
                     ("user_agent.original", "bench/1.0"), ("client.address", "10.0.0.7"))
            for k, v in attrs:
                sp.attributes.add(key=k, value=common_pb2.AnyValue(string_value=v))
            sp.attributes.add(key="http.response.status_code", value=common_pb2.AnyValue(int_value=200))
            sp.attributes.add(key="server.port", value=common_pb2.AnyValue(int_value=8080))
    return req.SerializeToString()


async def send(url: str, bodies: list[bytes], total_requests: int, concurrency: int,
               deadline: float | None = None) -> dict[int, int]:
    statuses: dict[int, int] = {}
    counter = iter(range(total_requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            for i in counter:
                if deadline and time.monotonic() > deadline:
                    return
                while True:
                    async with session.post(url, data=bodies[i % len(bodies)],
                                            headers={"Content-Type": "application/x-protobuf"}) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        if resp.status == 200:
                            break
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")) / 10)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def raw_chdb_insert(bodies: list[bytes], total_spans: int, work: Path) -> float:
    """Spans/s of a plain Arrow → chdb insert of the same decoded rows (no HTTP, no spool)."""
    import pyarrow as pa

    from meshlens.collector.columns import to_table
    from meshlens.collector.otlp import decode_traces
    from meshlens.collector.schema import Layout, migrate
    from meshlens.collector.stores import connect

    tables = [to_table("otel_traces", decode_traces(b, "protobuf").traces) for b in bodies]
    reps = max(1, total_spans // sum(t.num_rows for t in tables))
    table = pa.concat_tables(tables * reps)
    store = connect(f"chdb:{work / 'raw'}")
    migrate(store, Layout())
    started = time.perf_counter()
    step = 100_000
    for i in range(0, table.num_rows, step):
        store.insert("meshlens.otel_traces", table.slice(i, step), f"raw-{i}")
    elapsed = time.perf_counter() - started
    store.close()
    return table.num_rows / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--spans-per-request", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    args = ap.parse_args()

    rng = random.Random(7)
    bodies = [make_request(args.spans_per_request, rng) for _ in range(64)]
    requests = args.spans // args.spans_per_request
    total = requests * args.spans_per_request

    with tempfile.TemporaryDirectory(prefix="meshlens-bench-") as tmp:
        work = Path(tmp)
        ref = raw_chdb_insert(bodies, total, work)
        with CollectorProcess(work / "collector", None, "--batch-rows", "100000",
                              "--flush-interval", "1.0") as col:
            from meshlens.collector.stores import connect

            sampler = RssSampler(col.proc.pid)
            sampler.start()
            store = connect(col.query_url)
            started = time.perf_counter()
            statuses = asyncio.run(send(f"{col.base}/v1/traces", bodies, requests, args.concurrency))
            sent = time.perf_counter() - started
            while int(store.query_rows("SELECT count() FROM meshlens.otel_traces")[0][0]) < total:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            steady_peak = sampler.peak

            # Sustained overload: many producers, a small backlog limit is not needed —
            # the collector must shed load (429/503) rather than grow without bound.
            sampler.peak = 0.0
            over = asyncio.run(send(f"{col.base}/v1/traces", bodies, 10**9, args.concurrency * 4,
                                    deadline=time.monotonic() + args.overload_seconds))
            overload_peak = sampler.peak
            sampler.stop.set()

    rate = total / elapsed
    print(f"machine: {os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}")
    print(f"spans: {total} in {requests} requests of {args.spans_per_request}, concurrency {args.concurrency}")
    print(f"meshlens collector (OTLP/HTTP protobuf -> queryable): {rate:,.0f} spans/s "
          f"(all sent after {sent:.1f} s, all queryable after {elapsed:.1f} s) statuses={statuses}")
    print(f"raw chdb insert of the same rows (reference):           {ref:,.0f} spans/s")
    print(f"ratio collector/raw: {rate / ref:.3f}")
    print(f"collector peak RSS: {steady_peak:.0f} MB; under {args.overload_seconds:.0f} s of overload "
          f"({args.concurrency * 4} producers): {overload_peak:.0f} MB, statuses={over}")


if __name__ == "__main__":
    main()

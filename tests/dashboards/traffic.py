"""Traffic for the dashboard tests when the demo's store is not available: sent to a real collector.

Calls go through collector/client.py's CallRecorder to POST /v1/calls, spans
through the OpenTelemetry SDK's OTLP/HTTP exporter to /v1/traces, exactly as
sidecars and instrumented apps send them. The mix covers every panel: both
sidecars and the tap on some edges, a caller seen only by the tap (one by
address only), TLS and plaintext, 5xx and error classes, dry-run actions,
several protocols and routes, and traces across three services.
"""
from __future__ import annotations

import random
import time
import uuid

from meshlens.collector.client import CallRecorder
from meshlens.collector.record import Call

N_PER_EDGE = 300


def _hex(n: int, rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def calls(now_ns: int, rng: random.Random) -> list[Call]:
    out: list[Call] = []
    edges = [  # caller, callee, observers, tls, protocol, mode, routes
        ("web", "api", ("client", "server"), True, "http/1.1", "observe", ["/items/{id}", "/cart"]),
        ("api", "db", ("client", "server", "wire"), False, "http/1.1", "dry-run", ["/query"]),
        ("web", "search", ("client",), True, "h2", "enforce", ["/search"]),
        ("cron", "api", ("wire",), False, "http/1.1", "observe", ["/items/{id}"]),
        ("", "api", ("server",), False, "tcp", "observe", [""]),
        ("web", "api", ("otlp",), False, "http/1.1", "observe", ["/cart"]),
    ]
    for src, dst, observers, tls, protocol, mode, routes in edges:
        for i in range(N_PER_EDGE):
            t = now_ns - rng.randrange(0, 50 * 60) * 10**9 - rng.randrange(10**9)
            route = rng.choice(routes)
            path = route.replace("{id}", str(rng.randrange(100)))
            slow = rng.random() < 0.05
            dur = int(rng.lognormvariate(2.5, 0.6) * 1e6 * (20 if slow else 1))
            status, error, action = 200, "", ""
            r = rng.random()
            if r < 0.04:
                status = 503
            elif r < 0.06:
                status, error = 0, rng.choice(["timeout", "reset", "refused"])
            elif r < 0.08:
                status = 404
            if mode == "dry-run" and status >= 500:
                action = "would_retry"
            trace, span = _hex(32, rng), _hex(16, rng)
            for obs in observers:
                out.append(Call(
                    time=t, duration_ns=dur + (2_000_000 if obs == "client" else 0), observer=obs,
                    observer_id=f"{obs}-{dst}", trace_id=trace, span_id=span, src_service=src,
                    src_instance=f"{src or 'unknown'}-0", src_addr="10.0.0.%d" % (sum(map(ord, src)) % 200 + 1),
                    src_port=40000 + i % 1000, dst_service=dst, dst_subset="v1", dst_addr="10.0.1.1",
                    dst_port=8080, protocol=protocol, method="" if protocol == "tcp" else rng.choice(["GET", "POST"]),
                    authority=dst, path=path, route=route if obs == "otlp" else "", status=status,
                    request_bytes=rng.randrange(2000), response_bytes=rng.randrange(20000), error=error,
                    tls=tls, peer_identity=f"spiffe://cluster.local/ns/default/sa/{src}" if tls else "",
                    mode=mode, action=action, attempt=0))
    return out


def send_calls(collector_base: str, seed: int = 7) -> int:
    rng = random.Random(seed)
    rec = CallRecorder(f"{collector_base}/v1/calls", flush_interval=0.1)
    batch = calls(time.time_ns(), rng)
    for c in batch:
        rec.record(c)
    if not rec.flush(30):
        raise RuntimeError("the collector did not take the calls")
    rec.close()
    return len(batch)


def send_spans(collector_base: str, traces: int = 20) -> int:
    """Three-service traces (web -> api -> db) through the SDK's OTLP/HTTP exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

    providers = {}
    for name in ("web", "api", "db"):
        p = TracerProvider(resource=Resource.create({"service.name": name, "service.instance.id": f"{name}-0"}))
        p.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{collector_base}/v1/traces")))
        providers[name] = p
    n = 0
    for i in range(traces):
        web, api, db = (providers[s].get_tracer("dashboards-test") for s in ("web", "api", "db"))
        with web.start_as_current_span("GET /cart", kind=SpanKind.SERVER,
                                       attributes={"http.request.method": "GET", "url.path": "/cart",
                                                   "request.id": str(uuid.uuid4())}) as root:
            ctx = set_span_in_context(root)
            with api.start_as_current_span("GET /items/{id}", context=ctx, kind=SpanKind.SERVER,
                                           attributes={"http.route": "/items/{id}"}) as mid:
                with db.start_as_current_span("SELECT items", context=set_span_in_context(mid),
                                              kind=SpanKind.CLIENT) as leaf:
                    if i % 5 == 0:
                        leaf.set_status(Status(StatusCode.ERROR, "deadlock"))
        n += 3
    for p in providers.values():
        p.shutdown()
    return n

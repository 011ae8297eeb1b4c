"""Traffic for the dashboard tests when the demo's store is not available: sent to a real collector.

Calls go through collector/client.py's CallRecorder to POST /v1/calls, spans
through the OpenTelemetry SDK's OTLP/HTTP exporter to /v1/traces, and the
control plane's changes to POST /v1/changes, exactly as sidecars, instrumented
apps and the control plane send them. The mix covers every panel: both
sidecars and the tap on some edges, a caller seen only by the tap (one by
address only), TLS and plaintext, 5xx and error classes, dry-run actions,
several protocols and routes, traces across three services, and one service's
story through every mode (`PHASES`, with the changes that made it: `changes`).
"""
from __future__ import annotations

import json
import random
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from meshlens.collector.changes import MeshChange
from meshlens.collector.client import CallRecorder
from meshlens.collector.record import Call

N_PER_EDGE = 300
MINUTE_NS = 60 * 10**9
CONTROL_ID = "cp-1:15010"


@dataclass(frozen=True)
class Exchanges:
    """`n` exchanges web -> payments, as the two sidecars record them: the caller's row holds the words of the
    traffic policies (`client`), the callee's those of the inbound ones (`server`)."""

    n: int
    client: str = ""
    server: str = ""
    status: int = 200
    error: str = ""
    reached: bool = True
    """False: the callee never saw it (its connection was refused), so only the caller's row exists."""


# payments' story, in minutes ago: observed, tried in dry-run, enforced, and put back in dry-run by the guard.
PHASES: tuple[tuple[int, int, str, tuple[Exchanges, ...]], ...] = (
    (50, 40, "observe", (Exchanges(60), Exchanges(3, status=503))),
    (40, 25, "dry-run", (
        Exchanges(50), Exchanges(8, "would_retry", status=503),
        Exchanges(3, "would_retry", status=0, error="refused", reached=False),
        Exchanges(6, "would_timeout"), Exchanges(10, "would_route:v2"),
        Exchanges(4, "would_retry,would_eject", status=503), Exchanges(5, "would_route:v2", "would_deny"),
        Exchanges(3, server="would_rate_limit"), Exchanges(2, "would_fault"))),
    (25, 15, "enforce", (
        Exchanges(30), Exchanges(6, "retried"), Exchanges(4, "timed_out", status=504), Exchanges(8, "routed:v2"),
        Exchanges(3, "retried,retried,ejected", status=503), Exchanges(4, "routed:v2", "denied", status=403),
        Exchanges(2, server="rate_limited", status=429))),
    (15, 0, "dry-run", (Exchanges(40), Exchanges(3, "would_retry", status=503), Exchanges(2, "would_route:v3"))),
)


def _words(action: str) -> set[str]:
    return {w.split(":", 1)[0] for w in action.split(",") if w}


def planned(word: str) -> int:
    """Exchanges to payments whose caller's or callee's row holds `word` (without its :SUBSET)."""
    return sum(x.n for _, _, _, xs in PHASES for x in xs if word in _words(x.client) | _words(x.server))


def planned_words(prefix: str = "would_") -> set[str]:
    """Every word of the story that starts with `prefix` ('' for all)."""
    return {w for _, _, _, xs in PHASES for x in xs for w in _words(x.client) | _words(x.server)
            if w.startswith(prefix)}


def planned_calls(mode: str, callee_side: bool = False) -> int:
    """Exchanges to payments in `mode`; on the callee's side, only those that reached it."""
    return sum(x.n for _, _, m, xs in PHASES if m == mode for x in xs if x.reached or not callee_side)


def phase_windows(mode: str, now_ns: int) -> list[tuple[int, int]]:
    """The [start, end) ns of each phase in `mode`."""
    return [(now_ns - a * MINUTE_NS, now_ns - b * MINUTE_NS) for a, b, m, _ in PHASES if m == mode]


def _payments(now_ns: int, rng: random.Random) -> list[Call]:
    out: list[Call] = []
    for start, end, mode, exchanges in PHASES:
        for x in exchanges:
            for i in range(x.n):
                t = now_ns - start * MINUTE_NS + rng.randrange((start - end) * MINUTE_NS)
                dur = int(rng.lognormvariate(2.0 if mode != "enforce" else 2.6, 0.5) * 1e6)
                trace, span = _hex(32, rng), _hex(16, rng)
                rows = [("client", x.client, 2_000_000)] + ([("server", x.server, 0)] if x.reached else [])
                for obs, action, extra_ns in rows:
                    out.append(Call(
                        time=t, duration_ns=dur + extra_ns, observer=obs, observer_id=f"{obs}-payments",
                        trace_id=trace, span_id=span, src_service="web", src_instance="web-0", src_addr="10.0.0.9",
                        src_port=41000 + i, dst_service="payments", dst_subset="v1", dst_addr="10.0.1.7",
                        dst_port=8080, protocol="http/1.1", method="POST", authority="payments", path="/charge",
                        status=x.status, error=x.error, tls=True,
                        peer_identity="spiffe://cluster.local/ns/default/sa/web", mode=mode, action=action))
    return out


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
    return out + _payments(now_ns, rng)


def send_calls(collector_base: str, now_ns: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    rec = CallRecorder(f"{collector_base}/v1/calls", flush_interval=0.1)
    batch = calls(now_ns, rng)
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


def _doc(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    version = {"VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1",
               "PeerAuthentication": "security.istio.io/v1", "AuthorizationPolicy": "security.istio.io/v1"}
    meta = {"name": name, "namespace": namespace} if kind in version else {"name": name}
    return {"apiVersion": version.get(kind, "meshlens.io/v1alpha1"), "kind": kind, "metadata": meta, "spec": spec}


def _mode(service: str, mode: str) -> dict[str, Any]:
    return _doc("Mode", service, {"mode": mode})


# (minutes ago, revision, who, kind, name, service, action, from -> to mode, before, after, reason)
CHANGES: tuple[tuple[int, int, str, str, str, str, str, str, str, Any, Any, str], ...] = (
    (180, 1, "ana", "DestinationRule", "default/payments", "payments", "created", "", "", None,
     _doc("DestinationRule", "payments", {"host": "payments"}), "an earlier trial"),
    (48, 2, "ana", "Mode", "api", "api", "created", "observe", "observe", None, _mode("api", "observe"),
     "observe it, explicitly"),
    (46, 3, "ana", "Mode", "db", "db", "created", "observe", "dry-run", None, _mode("db", "dry-run"),
     "try retries on db"),
    (44, 4, "ana", "Mode", "db", "db", "configured", "dry-run", "enforce", _mode("db", "dry-run"),
     _mode("db", "enforce"), ""),
    (43, 5, "ana", "Mode", "db", "db", "configured", "enforce", "dry-run", _mode("db", "enforce"),
     _mode("db", "dry-run"), "too early: back to dry-run"),
    (41, 6, "ana", "VirtualService", "default/db", "db", "created", "", "", None,
     _doc("VirtualService", "db", {"hosts": ["db"], "http": [{"timeout": "2s"}]}), "db timeout"),
    (40, 7, "ana", "Mode", "payments", "payments", "created", "observe", "dry-run", None,
     _mode("payments", "dry-run"), "try retries, timeouts and v2"),
    (39, 8, "ana", "VirtualService", "default/payments", "payments", "created", "", "", None,
     _doc("VirtualService", "payments", {"hosts": ["payments"]}), "send 10% to v2"),
    (38, 9, "ana", "DestinationRule", "default/payments", "payments", "configured", "", "", None,
     _doc("DestinationRule", "payments", {"host": "payments", "trafficPolicy": {"outlierDetection": {}}}),
     "eject failing instances"),
    (37, 10, "bo", "AuthorizationPolicy", "default/payments-deny", "payments", "created", "", "", None,
     _doc("AuthorizationPolicy", "payments-deny", {"selector": {"matchLabels": {"app": "payments"}},
                                                   "action": "DENY"}), ""),
    (36, 11, "bo", "LocalRateLimit", "payments", "payments", "created", "", "", None,
     _doc("LocalRateLimit", "payments", {"service": "payments"}), "protect the card processor"),
    (32, 12, "bo", "PeerAuthentication", "default/default", "", "created", "", "", None,
     _doc("PeerAuthentication", "default", {"mtls": {"mode": "PERMISSIVE"}}), "PERMISSIVE everywhere first"),
    (30, 13, "ana", "VirtualService", "default/checkout", "payments,search", "created", "", "", None,
     _doc("VirtualService", "checkout", {"hosts": ["payments", "search"]}), "one route for checkout"),
    (25, 14, "ana", "Mode", "payments", "payments", "configured", "dry-run", "enforce",
     _mode("payments", "dry-run"), _mode("payments", "enforce"), "dry-run looked right"),
    (15, 15, "meshlens-guard", "Mode", "payments", "payments", "configured", "enforce", "dry-run",
     _mode("payments", "enforce"), _mode("payments", "dry-run"), "guard: 9.1% failed in enforce, 1.2% in dry-run"),
)


# The change a second collector is shipped again (tests/dashboards/conftest.py), so the table holds it twice.
RESHIPPED = 14


def changes(now_ns: int) -> list[dict[str, Any]]:
    """`CHANGES` as the control plane ships them (control/changes.py), times relative to `now_ns`."""
    return [MeshChange(time=now_ns - ago * MINUTE_NS, revision=rev, who=who, kind=kind, name=name, service=service,
                       action=action, from_mode=from_mode, to_mode=to_mode, before=before, after=after, reason=reason,
                       control_id=CONTROL_ID).as_json()
            for ago, rev, who, kind, name, service, action, from_mode, to_mode, before, after, reason in CHANGES]


def send_changes(collector_base: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """POST /v1/changes, as the control plane's ChangeShipper does; the collector's answer."""
    request = urllib.request.Request(f"{collector_base}/v1/changes", json.dumps({"changes": rows}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())

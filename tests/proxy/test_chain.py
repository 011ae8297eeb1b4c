"""Three services, A -> B -> C, each with its sidecar, recording into one real collector: every hop is
seen by both observers (the caller's sidecar and the callee's), in one trace, with the right services.
Once in explicit mode on loopback (the apps use their sidecar as a forward proxy and name the next
service), once in transparent mode (a namespace per service, iptables REDIRECT, apps that call plain
addresses)."""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.collector_process import CollectorProcess
from tests.netns import Namespaces
from tests.proxy.chain_app import ChainApp
from tests.proxy.conftest import free_port
from tests.proxy.meshnet import APP_PORT, MeshNet
from tests.proxy.processes import ProxyProcess, recorded_calls
from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"
COLUMNS = ("observer", "trace_id", "span_id", "parent_span_id", "src_service", "dst_service", "path", "status",
           "error")
# The chain's hops, as (src_service, dst_service): the unmeshed client (curl) calls A, A calls B, B calls C.
HOPS = [("", "a"), ("a", "b"), ("b", "c")]


def check_chain(answer: dict, calls: list[dict]) -> None:
    """The answer went A -> B -> C; each meshed hop was recorded by both sides, all in one trace."""
    assert answer["service"] == "a" and answer["next"]["service"] == "b" and answer["next"]["next"]["service"] == "c"
    assert {answer["peer_field"], answer["next"]["peer_field"], answer["next"]["next"]["peer_field"]} == {None}
    assert calls and all(c["trace_id"] == TRACE for c in calls), calls
    seen = Counter((c["observer"], c["src_service"], c["dst_service"]) for c in calls)
    assert seen == Counter({("server", "", "a"): 1, ("client", "a", "b"): 1, ("server", "a", "b"): 1,
                            ("client", "b", "c"): 1, ("server", "b", "c"): 1}), calls
    assert all((c["status"], c["error"], c["path"]) == (200, "", "/call") for c in calls), calls
    # one span per sidecar, each the child of the one before: curl's span -> A in -> A out -> B in -> B out -> C in
    order = [("server", "a"), ("client", "b"), ("server", "b"), ("client", "c"), ("server", "c")]
    spans = [next(c for c in calls if (c["observer"], c["dst_service"]) == o) for o in order]
    assert spans[0]["parent_span_id"] == TRACEPARENT.split("-")[2]
    for parent, child in zip(spans, spans[1:]):
        assert child["parent_span_id"] == parent["span_id"], (parent, child)


# -- explicit mode, on loopback ---------------------------------------------------------------------------


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[tuple[CollectorProcess, list[ProxyProcess]]]:
    """Collector; C's app and sidecar; B's; A's. Each mesh file names every service and where the next
    sidecar's inbound listens; each app calls http://NEXT/call through its own sidecar's outbound."""
    started: list[ServerProcess] = []
    try:
        col = CollectorProcess(tmp_path / "collector")
        started.append(col)
        col.start()
        url = f"{col.base}/v1/calls"
        mesh: dict = {"services": {"a": {}, "b": {}, "c": {}}}
        sidecars: list[ProxyProcess] = []
        for name, nxt in (("c", None), ("b", "c"), ("a", "b")):
            app_port = free_port()  # the sidecar is told the app's port before the app is told the sidecar's
            sidecar = ProxyProcess(tmp_path / f"{name}-sidecar", json.dumps(mesh), name,
                                   "--app-port", str(app_port), "--collector", url)
            started.append(sidecar)
            sidecars.insert(0, sidecar.start())
            app = ChainApp(tmp_path / name, name, app_port, next_url=f"http://{nxt}/call" if nxt else None,
                           proxy=f"http://127.0.0.1:{sidecar.outbound}")
            started.append(app)
            app.start()
            mesh = json.loads(json.dumps(mesh))
            mesh["services"][name] = {"instances": [f"127.0.0.1:{sidecar.inbound}"]}
        yield col, sidecars  # a, b, c
    finally:
        for p in reversed(started):
            p.stop()
            p.kill()


def test_a_chain_of_explicit_sidecars_is_one_trace_seen_from_both_sides(explicit) -> None:
    col, sidecars = explicit
    r = subprocess.run(["curl", "-sS", "--max-time", f"{PATIENCE_S:g}", "-H", f"traceparent: {TRACEPARENT}",
                        f"http://127.0.0.1:{sidecars[0].inbound}/call"], capture_output=True, text=True, timeout=PATIENCE_S + 30)
    answer = json.loads(r.stdout)
    # traceparent as each app received it: each sidecar continued the trace with a span of its own
    assert answer["traceparent"].split("-")[1] == answer["next"]["next"]["traceparent"].split("-")[1] == TRACE
    # an app cannot speak for another service: A's sidecar replaces the field, B's strips it
    out = f"http://127.0.0.1:{sidecars[0].outbound}/call"
    spoofed = subprocess.run(["curl", "-sS", "--max-time", f"{PATIENCE_S:g}", "-H", "Host: c", "-H", "x-meshlens-peer: b", out],
                             capture_output=True, text=True, timeout=PATIENCE_S + 30)
    assert json.loads(spoofed.stdout) == {"service": "c", "traceparent": json.loads(spoofed.stdout)["traceparent"],
                                          "peer_field": None}
    # the sidecar's own name on an outbound request means the request already went through it
    looped = subprocess.run(["curl", "-sS", "--max-time", f"{PATIENCE_S:g}", "-o", "/dev/null", "-w", "%{http_code}",
                             "-H", "Host: c", "-H", "x-meshlens-peer: a", out], capture_output=True, text=True, timeout=PATIENCE_S + 30)
    assert looped.stdout == "508"
    for p in sidecars:
        assert p.stop() == 0  # SIGTERM drains and flushes the recorder
    calls = recorded_calls(col.query_url, "1", 8, columns=COLUMNS)  # the sidecars flushed on SIGTERM
    check_chain(answer, [c for c in calls if c["trace_id"] == TRACE])
    others = sorted((c["observer"], c["src_service"], c["dst_service"], c["status"], c["error"])
                    for c in calls if c["trace_id"] != TRACE)
    assert others == [("client", "a", "", 508, "loop"), ("client", "a", "c", 200, ""), ("server", "a", "c", 200, "")]


# -- transparent mode, a namespace per service --------------------------------------------------------------


@pytest.fixture
def transparent(tmp_path: Path) -> Iterator[MeshNet]:
    """a 10.200.0.1, b .2, c .3: each app on :8080 calls the next one's address, no proxy settings."""
    with Namespaces("mlch") as namespaces:
        net = MeshNet(tmp_path, namespaces)
        try:
            net.start_hub()
            for i, name in enumerate("abc", 1):
                net.add_node(name, i)
            for name, nxt in (("c", None), ("b", "c"), ("a", "b")):
                net.start_node(net.nodes[name], f"http://{net.nodes[nxt].ip}:{APP_PORT}/call" if nxt else None)
            yield net
        finally:
            net.close()


def test_a_chain_of_transparent_sidecars_is_one_trace_seen_from_both_sides(transparent: MeshNet) -> None:
    net = transparent
    r = net.curl(net.hub, "-H", f"traceparent: {TRACEPARENT}", f"http://{net.nodes['a'].ip}:{APP_PORT}/call")
    answer = json.loads(r.stdout)
    net.stop_sidecars()
    calls = net.calls(5, ", ".join(COLUMNS))
    check_chain(answer, calls)
    # the callers were named by their addresses (the mesh lists each service's namespace address)
    assert {c["src_service"] for c in calls if c["observer"] == "server"} == {"", "a", "b"}

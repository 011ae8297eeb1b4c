"""proxy/router.py as transcripts: lookups in, in order, the Route or LocalReply each gives out."""
from __future__ import annotations

import random

import pytest

from meshlens.mesh import parse
from meshlens.proxy.connect import DPE, UH, LocalReply
from meshlens.proxy.router import ROUTE_CACHE_SIZE, Route, Router

MESH = parse({"services": {
    "web": {"instances": ["10.0.0.2:8080"]},
    "backend": {"instances": [{"address": "10.0.0.5:8080", "labels": {"version": "v1"}},
                              {"address": "10.0.0.6:8080", "labels": {"version": "v2"}}],
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}},
    "payment": {"instances": ["10.0.0.9:9090", "10.0.0.9:9091"]},  # two ports: one service at that IP
    "batch": {},
    "shared-a": {"instances": ["10.0.0.7:80"]},
    "shared-b": {"instances": ["10.0.0.7:81"]},  # two services at one IP: the address names no caller
}})


def router(service: str = "web", app: tuple[str, int] | None = ("127.0.0.1", 8080)) -> Router:
    r = Router(MESH, MESH.service(service), app, "127.0.0.1", random.Random(7))
    r.outbound_port = 15001
    return r


def replay(r: Router, transcript: list[tuple[str, tuple, Route | LocalReply]]) -> None:
    for i, (lookup, args, expected) in enumerate(transcript):
        got = getattr(r, lookup)(*args)
        assert got == expected, f"step {i}: {lookup}{args}"


def test_explicit_outbound_by_host_balances_services_and_names_addresses() -> None:
    replay(router(), [
        ("outbound", (b"backend",), Route(("10.0.0.5", 8080), "backend", "v1")),
        ("outbound", (b"backend:8080",), Route(("10.0.0.6", 8080), "backend", "v2")),  # round robin, port ignored
        ("outbound", (b"backend",), Route(("10.0.0.5", 8080), "backend", "v1")),
        ("outbound", (b"10.0.0.9:9091",), Route(("10.0.0.9", 9091), "payment", "")),  # an instance's address
        ("outbound", (b"example.com",), Route(("example.com", 80), "example.com:80", "")),  # not in the mesh
        ("outbound", (b"[FD00::1]:8443",), Route(("fd00::1", 8443), "[fd00::1]:8443", "")),
        ("outbound", (b"",), LocalReply(400, "no Host header and no absolute-form target", "protocol_error", DPE)),
        ("outbound", (b"x:port",), LocalReply(400, "cannot route to 'x:port'", "protocol_error", DPE)),
        ("outbound", (b"batch",), LocalReply(503, "service batch has no instances", "no_healthy_upstream", UH)),
        ("outbound", (b"127.0.0.1:15001",),
         LocalReply(508, "request would loop back into the outbound listener", "loop")),
        ("outbound", (b"backend", b" web "),  # our own x-meshlens-peer: it went through this sidecar already
         LocalReply(508, "request came back into the outbound listener (proxy traffic redirected?)", "loop")),
        ("outbound", (b"backend", b"payment"), Route(("10.0.0.6", 8080), "backend", "v2")),  # someone else's: kept
    ])


def test_transparent_outbound_goes_to_the_service_the_host_names_else_where_the_app_was_connecting() -> None:
    dst = ("10.0.0.9", 9090)
    replay(router(), [
        ("outbound", (b"backend", b"", dst), Route(("10.0.0.5", 8080), "backend", "v1")),
        ("outbound", (b"unknown.example", b"", dst), Route(dst, "payment", "")),
        ("outbound", (b"", b"", ("192.0.2.1", 443)), Route(("192.0.2.1", 443), "192.0.2.1:443", "")),
        ("outbound", (b"", b"", ("127.0.0.1", 15001)),
         LocalReply(508, "request would loop back into the outbound listener", "loop")),
        ("address", (("10.0.0.6", 8080),), Route(("10.0.0.6", 8080), "backend", "v2")),
        ("address", (("::1", 15001),), LocalReply(508, "request would loop back into the outbound listener", "loop")),
    ])


def test_inbound_goes_to_the_app_and_names_the_caller_by_address_or_by_its_sidecars_field() -> None:
    app = ("127.0.0.1", 8080)
    replay(router("backend", app), [
        ("inbound", ("10.0.0.9",), Route(app, "backend", "", "payment")),  # the one service at that IP
        ("inbound", ("10.0.0.9", b"web"), Route(app, "backend", "", "payment")),  # the address wins
        ("inbound", ("10.0.0.7",), Route(app, "backend", "", "")),  # two services there: no one
        ("inbound", ("10.0.0.7", b"shared-b"), Route(app, "backend", "", "shared-b")),
        ("inbound", ("127.0.0.1", b" web\t"), Route(app, "backend", "", "web")),  # loopback names no one
        ("inbound", ("127.0.0.1", b"not-in-mesh"), Route(app, "backend", "", "")),
        ("inbound", ("192.0.2.5",), Route(app, "backend", "", "")),
    ])


def test_the_apps_subset_is_the_one_its_address_has_in_the_mesh() -> None:
    assert router("backend", ("10.0.0.6", 8080)).inbound("127.0.0.1") == Route(("10.0.0.6", 8080), "backend", "v2")


def test_routes_to_single_addresses_are_cached_and_balanced_ones_are_not() -> None:
    r = router()
    assert r.outbound(b"example.com") is r.outbound(b"example.com")
    assert r.address(("192.0.2.1", 80)) is r.address(("192.0.2.1", 80))
    assert r.inbound("10.0.0.9") is r.inbound("10.0.0.9")
    assert r.outbound(b"backend").addr != r.outbound(b"backend").addr


def test_the_caches_are_bounded() -> None:
    r = router()
    for i in range(ROUTE_CACHE_SIZE + 10):
        r.outbound(b"host-%d.example" % i)
    assert len(r._by_authority) == ROUTE_CACHE_SIZE
    assert r.outbound(b"host-%d.example" % (ROUTE_CACHE_SIZE + 5)) == Route(
        (f"host-{ROUTE_CACHE_SIZE + 5}.example", 80), f"host-{ROUTE_CACHE_SIZE + 5}.example:80", "")


def test_a_balanced_route_counts_as_active_on_its_endpoint_until_finished() -> None:
    r = router()
    first, second = r.outbound(b"backend"), r.outbound(b"backend")
    cluster = r.clusters["backend"]
    assert [ep.active for ep in cluster.endpoints] == [1, 1]
    assert first.endpoint is cluster.endpoints[0] and second.endpoint is cluster.endpoints[1]
    r.finished(first)
    r.finished(r.outbound(b"example.com"))  # not balanced: nothing to count
    assert [ep.active for ep in cluster.endpoints] == [0, 1]


def test_least_request_services_are_balanced_by_their_active_requests() -> None:
    mesh = parse({"services": {"web": {}, "api": {"load_balancer": "LEAST_REQUEST",
                                                  "instances": ["10.0.1.1:80", "10.0.1.2:80"]}}})
    r = Router(mesh, mesh.service("web"), None, "127.0.0.1", random.Random(1))
    held = r.outbound(b"api")  # in flight from here on
    picks = []
    for _ in range(400):  # short exchanges, one at a time, while `held` runs
        picks.append(route := r.outbound(b"api"))
        r.finished(route)
    share = sum(p.addr == held.addr for p in picks) / len(picks)
    assert 0.15 < share < 0.35, share  # the busy endpoint wins only when both draws are it (1/4)


@pytest.mark.parametrize("inbound, route, expected", [
    (False, None, "web"),
    (False, Route(("10.0.0.5", 8080), "backend", "v1"), "web"),
    (True, Route(("127.0.0.1", 8080), "web", "", "payment"), "payment"),
    (True, None, ""),
])
def test_source_service_is_this_service_outbound_and_the_routes_caller_inbound(inbound, route, expected) -> None:
    assert router().source_service(inbound, route) == expected


def test_a_new_mesh_keeps_the_instances_that_stay_with_their_requests_in_flight() -> None:
    old = parse({"services": {"web": {}, "api": {"instances": ["10.0.0.1:80", "10.0.0.2:80"],
                                                  "load_balancer": "LEAST_REQUEST"}}})
    router = Router(old, old.service("web"))
    in_flight = router.balanced("api")
    assert isinstance(in_flight, Route)
    new = parse({"services": {"web": {}, "api": {"instances": [in_flight.addr[0] + ":80", "10.0.0.9:80"],
                                                  "subsets": {}, "load_balancer": "LEAST_REQUEST"}}})
    router.update(new, new.service("web"))
    kept = next(ep for ep in router.clusters["api"].endpoints if ep.addr == in_flight.addr)
    assert kept is in_flight.endpoint and kept.active == 1  # still counted: least-request avoids it
    assert {ep.addr for ep in router.clusters["api"].endpoints} == {in_flight.addr, ("10.0.0.9", 80)}
    router.finished(in_flight)
    assert kept.active == 0


def test_a_request_to_a_service_that_left_the_mesh_still_finishes() -> None:
    old = parse({"services": {"web": {}, "api": {"instances": ["10.0.0.1:80"]}}})
    router = Router(old, old.service("web"))
    in_flight = router.balanced("api")
    new = parse({"services": {"web": {}}})
    router.update(new, new.service("web"))
    router.finished(in_flight)  # no cluster any more: nothing to count, nothing raised
    assert "api" not in router.clusters and isinstance(router.outbound(b"api"), Route)  # api is now an address

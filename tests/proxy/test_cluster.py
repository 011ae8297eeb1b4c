"""proxy/cluster.py: which endpoints the picks go to, for each load balancer, with a seeded random."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlens.mesh import Service, parse
from meshlens.proxy.cluster import LEAST_REQUEST_CHOICES, Cluster, Endpoint


def service(lb: str = "ROUND_ROBIN", n: int = 3) -> Service:
    doc = {"services": {"api": {"load_balancer": lb, "subsets": {"canary": {"track": "canary"}},
                                "instances": [{"address": f"10.0.0.{i + 1}:80",
                                               "labels": {"track": "canary" if i == n - 1 else "stable"}}
                                              for i in range(n)]}}}
    return parse(doc).service("api")


def picks(cluster: Cluster, n: int) -> Counter[str]:
    return Counter(f"{ep.host}:{ep.port}" for ep in (cluster.pick() for _ in range(n)))  # type: ignore[union-attr]


def test_endpoints_are_the_services_instances_with_their_subsets() -> None:
    cluster = Cluster(service())
    assert [(ep.addr, ep.subset, ep.active) for ep in cluster.endpoints] == [
        (("10.0.0.1", 80), "", 0), (("10.0.0.2", 80), "", 0), (("10.0.0.3", 80), "canary", 0)]
    assert cluster.load_balancer == "ROUND_ROBIN"


def test_round_robin_takes_each_endpoint_in_turn_in_the_mesh_files_order() -> None:
    cluster = Cluster(service())
    assert [cluster.pick().host for _ in range(7)] == [  # type: ignore[union-attr]
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
    cluster.started(cluster.endpoints[1])  # active requests do not matter to round robin
    assert picks(cluster, 299) == {"10.0.0.1:80": 99, "10.0.0.2:80": 100, "10.0.0.3:80": 100}


def test_least_request_with_every_endpoint_idle_spreads_evenly() -> None:
    got = picks(Cluster(service("LEAST_REQUEST"), random.Random(42)), 3000)
    assert set(got) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
    assert all(900 < n < 1100 for n in got.values()), got


def test_least_request_prefers_the_idle_endpoint() -> None:
    cluster = Cluster(service("LEAST_REQUEST"), random.Random(42))
    busy = cluster.endpoints[0]
    for _ in range(5):
        cluster.started(busy)
    got = picks(cluster, 3000)
    # the busy one is taken only when both draws are it: (1/3)^2 of the picks
    assert 250 < got["10.0.0.1:80"] < 420, got
    assert all(1200 < got[a] < 1500 for a in ("10.0.0.2:80", "10.0.0.3:80")), got


def test_least_request_compares_the_draws_active_counts_and_keeps_the_first_on_a_tie() -> None:
    cluster = Cluster(service("LEAST_REQUEST"))
    draws = iter([0.9, 0.1,    # endpoint 2 then 0: both idle, the first drawn kept
                  0.9, 0.1,    # 2 is busy now: 0 is taken
                  0.1, 0.5])   # 0 is busy too (1 each), 1 is idle
    cluster._random = lambda: next(draws)
    first = cluster.pick()
    assert first is cluster.endpoints[2]
    cluster.started(first)
    second = cluster.pick()
    assert second is cluster.endpoints[0]
    cluster.started(second)
    assert cluster.pick() is cluster.endpoints[1]
    assert LEAST_REQUEST_CHOICES == 2  # Envoy's choice_count default


def test_least_request_follows_the_requests_as_they_finish() -> None:
    """A closed loop: 60 exchanges in flight, each finishing after 3 later picks, one endpoint 4x slower."""
    cluster = Cluster(service("LEAST_REQUEST"), random.Random(3))
    slow = cluster.endpoints[0]
    in_flight: list[tuple[int, Endpoint]] = []
    taken: Counter[str] = Counter()
    for t in range(6000):
        ep = cluster.pick()
        assert ep is not None
        cluster.started(ep)
        taken[ep.host] += 1
        in_flight.append((t + (12 if ep is slow else 3), ep))
        for done in [f for f in in_flight if f[0] <= t]:
            in_flight.remove(done)
            cluster.finished(done[1])
    assert taken["10.0.0.1"] < taken["10.0.0.2"] * 0.8 and taken["10.0.0.1"] < taken["10.0.0.3"] * 0.8, taken


def test_active_requests_are_counted_and_never_go_below_zero() -> None:
    cluster = Cluster(service())
    ep = cluster.endpoints[0]
    cluster.started(ep)
    cluster.started(ep)
    cluster.finished(ep)
    assert ep.active == 1
    cluster.finished(ep)
    cluster.finished(ep)
    assert ep.active == 0


@pytest.mark.parametrize("lb", ["ROUND_ROBIN", "LEAST_REQUEST"])
def test_no_endpoints_is_none_and_one_endpoint_is_always_it(lb: str) -> None:
    assert Cluster(service(lb, 0)).pick() is None
    one = Cluster(service(lb, 1))
    one.started(one.endpoints[0])
    assert {one.pick() is one.endpoints[0] for _ in range(5)} == {True}

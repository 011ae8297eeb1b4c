"""Istio YAML: valid documents, the right field names, evidence in comments."""
from __future__ import annotations

import pytest
import yaml

from meshlens.analysis import istio_yaml, open_scope, recommend
from meshlens.analysis.uri_match import uri_match
from tests.analysis import traffic as gt
from tests.analysis.test_uri_match import istio_matches


@pytest.fixture(scope="module")
def docs(store):
    text = istio_yaml(recommend(store, gt.WINDOW))
    return text, [d for d in yaml.safe_load_all(text) if d]


def find(docs, kind, name):
    [d] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def test_virtual_service_carries_timeout_and_retries(docs):
    text, ds = docs
    vs = find(ds, "VirtualService", "catalog")
    [route] = [h for h in vs["spec"]["http"] if "match" in h]
    assert route["match"][0]["uri"] == {"regex": "^/products/[^/]+$"}
    assert route["match"][0]["sourceLabels"] == {"app": "frontend"}
    assert set(route["retries"]) == {"attempts", "perTryTimeout", "retryOn"}
    assert route["retries"]["perTryTimeout"].endswith("ms") and route["timeout"].endswith("ms")
    assert "# WARNING: retry amplification" in text


def test_unsafe_routes_turn_istios_default_retries_off(docs):
    vs = find(docs[1], "VirtualService", "checkout")
    [route] = [h for h in vs["spec"]["http"] if "match" in h]
    assert route["retries"] == {"attempts": 0}


def test_persistently_failing_routes_turn_istios_default_retries_off(docs):
    # frontend -> cart fails every call during an outage: retrying would only add load
    vs = find(docs[1], "VirtualService", "cart")
    routes = [h for h in vs["spec"]["http"] if "match" in h and h["match"][0]["sourceLabels"] == {"app": "frontend"}]
    assert routes and all(h["retries"] == {"attempts": 0} for h in routes)


def test_destination_rule_ejects_with_istio_field_names(docs):
    od = find(docs[1], "DestinationRule", "inventory")["spec"]["trafficPolicy"]["outlierDetection"]
    assert set(od) == {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval", "baseEjectionTime",
                       "maxEjectionPercent"}
    assert f"# instances expected to be ejected: {gt.BAD_INSTANCE}" in docs[0]


def test_peer_authentication_modes(docs):
    modes = {d["metadata"]["name"]: d["spec"]["mtls"]["mode"] for d in docs[1] if d["kind"] == "PeerAuthentication"}
    assert modes["catalog"] == "STRICT" and modes["payments"] == "PERMISSIVE" and modes["accounts"] == "PERMISSIVE"
    assert "search" not in modes
    assert "# mtls search: not enough data (n=50" in docs[0]


def test_uri_match():
    assert uri_match("/a/{id}/b.c") == {"regex": r"^/a/[^/]+/b\.c$"}
    assert uri_match("/orders") == {"exact": "/orders"}


def test_every_uri_match_takes_every_recorded_path_of_its_route(store, docs):
    # All distinct paths of each route as the analysis saw them (one observer per edge), not a sample.
    scope = open_scope(store, gt.WINDOW)
    rows = store.query_rows(f"SELECT caller, toString(dst_service), toString(method), route_t, groupUniqArray(path) "
                            f"FROM {scope.calls()} GROUP BY 1, 2, 3, 4")
    recorded = {tuple(r[:4]): r[4] for r in rows}
    checked = 0
    for vs in (d for d in docs[1] if d["kind"] == "VirtualService"):
        for h in (h for h in vs["spec"]["http"] if "match" in h):
            [m] = h["match"]
            caller, method, route = h["name"].split(" ", 2)
            assert (m["sourceLabels"]["app"], m["method"]["exact"]) == (caller, method)
            paths = recorded[(caller, vs["metadata"]["name"], method, route)]
            assert paths and all(istio_matches(m["uri"], p) and istio_matches(m["uri"], p + "?x=1") for p in paths)
            checked += len(paths)
    assert checked > 1000

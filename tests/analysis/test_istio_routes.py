"""The uri matches of `recommend` YAML take the recorded requests of their own route, and only those.

Calls with app-templated routes (each framework syntax) and meshlens-templated ones go into a real
embedded store; the real recommend + istio_yaml run; every recorded path (with and without a query
string) is then routed the way Envoy does it as Istio configures it: the first `http` entry whose
match matches, with exact = equality, regex = RE2 full match on the path without the query.
"""
from __future__ import annotations

import pytest
import yaml

from meshlens.analysis import istio_yaml, recommend
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.stores.embedded import EmbeddedStore
from tests.analysis import traffic as gt
from tests.analysis.test_uri_match import istio_matches

N = 1100  # above TIMEOUT_MIN_N: every route gets a timeout, hence an http entry
CALLER, CALLEE = "web", "shop"

# route column as the app's spans carry it ('' = meshlens templates the path), the route the
# recommendation names, and the recorded paths; None = no entry expected (a comment instead).
ROUTES: list[tuple[str, str | None, object]] = [
    ("/stock/{sku}", "/stock/{sku}", lambda i: f"/stock/SKU-{i}.v2+x"),
    ("/stock/{sku}/history", "/stock/{sku}/history", lambda i: f"/stock/SKU-{i}/history"),
    ("/users/:id", "/users/:id", lambda i: f"/users/u{i}"),
    ("/users/export", "/users/export", lambda i: "/users/export"),
    ("/teams/:team?", "/teams/:team?", lambda i: "/teams" if i % 3 == 0 else f"/teams/t{i}"),
    ("/files/{*path}", "/files/{*path}", lambda i: "/files" if i % 5 == 0 else f"/files/a{i}/b/c.txt"),
    ("/assets/{path...}", "/assets/{path...}", lambda i: f"/assets/css/s{i}.css"),
    ("/static/*", "/static/*", lambda i: f"/static/js/app{i}.js"),
    ("/blobs/*key", "/blobs/*key", lambda i: f"/blobs/k{i}/part"),
    ("/v1.2/items/{id}", "/v1.2/items/{id}", lambda i: f"/v1.2/items/n{i}"),
    ("/v1x2/items/{id}", "/v1x2/items/{id}", lambda i: f"/v1x2/items/n{i}"),
    ("/orders/<int:order_id>", "/orders/<int:order_id>", lambda i: f"/orders/{i}"),
    ("/reports/:id(.:format)", "/reports/:id(.:format)", lambda i: f"/reports/r{i}" + (".csv" if i % 2 else "")),
    ("api/orders/{id?}", "api/orders/{id?}", lambda i: "/api/orders" if i % 4 == 0 else f"/api/orders/{i}"),
    ("/docs/[...slug]", "/docs/[...slug]", lambda i: f"/docs/guide/p{i}"),
    ("/members/:id", "/members/:id", lambda i: f"/members/m{i}/"),  # Express answers `/a/` as `/a`
    ("", "/carts/{id}", lambda i: f"/carts/{i:08x}-0000-4000-8000-{i:012x}"),
    ("", "/carts/{id}/items/{id}", lambda i: f"/carts/{i:08x}-0000-4000-8000-{i:012x}/items/{i}"),
    ("/webhooks/{hook}", None, lambda i: ""),            # spans with http.route and no url.path
    ("items/{id}", None, lambda i: f"/shop/items/{i}"),  # the route lacks the app's root
]


@pytest.fixture(scope="module")
def routes_store(tmp_path_factory):
    s = EmbeddedStore(tmp_path_factory.mktemp("routes") / "chdb")
    migrate(s, Layout())
    s.use_database()
    tr = gt.Traffic(seed=11)
    for route, _, paths in ROUTES:
        tr.add(N, CALLER, CALLEE, "GET", paths, (10, 0.3, 60), instances=["10.0.20.1:8080"])
        tr.cols.setdefault("route", []).extend([route] * N)
    tr.write(s)
    yield s
    s.close()


@pytest.fixture(scope="module")
def emitted(routes_store):
    text = istio_yaml(recommend(routes_store, gt.WINDOW))
    [vs] = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "VirtualService"]
    return text, [h for h in vs["spec"]["http"] if "match" in h]


def recorded(paths) -> list[str]:
    return sorted({paths(i) for i in range(N)})


def first_entry(entries, request_path: str) -> str | None:
    """The name of the http entry Istio routes this request (GET from web) to, None for the default route."""
    for h in entries:
        [m] = h["match"]
        if m["method"] == {"exact": "GET"} and m["sourceLabels"] == {"app": CALLER} and istio_matches(m["uri"],
                                                                                                     request_path):
            return h["name"]
    return None


def test_every_route_with_paths_gets_an_entry(emitted):
    _, entries = emitted
    assert {h["name"] for h in entries} == {f"{CALLER} GET {r}" for _, r, _ in ROUTES if r is not None}


@pytest.mark.parametrize("app_route, route, paths", ROUTES, ids=[r[1] or r[0] for r in ROUTES])
def test_each_recorded_path_goes_to_its_own_routes_entry(emitted, app_route, route, paths):
    _, entries = emitted
    expected = None if route is None else f"{CALLER} GET {route}"
    for p in recorded(paths):
        if not p:
            continue
        for request in (p, p + "?page=2&sort=-date", p + "?next=/users/export"):
            assert first_entry(entries, request) == expected, (request, expected)


def test_each_match_matches_all_its_paths_not_just_first_wins(emitted):
    # Own paths, independently of ordering: the match itself must take every recorded path.
    _, entries = emitted
    by_name = {h["name"]: h["match"][0]["uri"] for h in entries}
    for _, route, paths in ROUTES:
        if route is not None:
            uri = by_name[f"{CALLER} GET {route}"]
            assert all(istio_matches(uri, p) for p in recorded(paths)), (route, uri)


def test_differing_templates_do_not_take_each_others_paths(emitted):
    _, entries = emitted
    by_name = {h["name"]: h["match"][0]["uri"] for h in entries}
    pairs = [("/stock/{sku}", "/stock/{sku}/history"), ("/v1.2/items/{id}", "/v1x2/items/{id}"),
             ("/carts/{id}", "/carts/{id}/items/{id}"), ("/users/export", "/users/:id")]
    for a, b in pairs:
        paths_b = recorded(dict((r, p) for _, r, p in ROUTES)[b])
        assert not any(istio_matches(by_name[f"{CALLER} GET {a}"], p) for p in paths_b), (a, b)
    assert all("regex" in u and u["regex"] not in ("^.*$", ".*") for n, u in by_name.items() if "export" not in n)


def test_literal_route_is_exact_and_regexes_escape_dots(emitted):
    _, entries = emitted
    by_name = {h["name"]: h["match"][0]["uri"] for h in entries}
    assert by_name[f"{CALLER} GET /users/export"] == {"exact": "/users/export"}
    assert by_name[f"{CALLER} GET /v1.2/items/{{id}}"] == {"regex": r"^/v1\.2/items/[^/]+$"}
    assert by_name[f"{CALLER} GET /stock/{{sku}}"] == {"regex": "^/stock/[^/]+$"}


def test_routes_without_a_usable_match_are_comments(emitted):
    text, _ = emitted
    assert "no path was recorded for route '/webhooks/{hook}'" in text
    assert "translated from route 'items/{id}', does not match" in text
    assert "e.g. '/shop/items/" in text

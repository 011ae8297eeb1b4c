"""The traffic model: one observer per edge, templated routes, depth."""
from __future__ import annotations

import pytest

from meshlens.analysis import analyze, open_scope
from meshlens.analysis.graph import downstream_depth, timeseries
from tests.analysis import traffic as gt


@pytest.fixture(scope="module")
def model(store):
    return analyze(store, gt.WINDOW)


def edge(model, caller, callee):
    rows = model.edges[(model.edges["caller"] == caller) & (model.edges["callee"] == callee)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_an_exchange_seen_by_two_observers_is_counted_once(model, store):
    both = store.query_rows("SELECT count() FROM calls WHERE src_service = 'frontend' AND dst_service = 'catalog'")
    assert both[0][0] == 2 * gt.CATALOG_N
    e = edge(model, "frontend", "catalog")
    assert (e["n"], e["observer"]) == (gt.CATALOG_N, "client")


def test_unnamed_copies_of_calls_a_sidecar_saw_are_not_counted_again(model, store):
    """The tap's and the spans' copies of frontend → accounts name no caller: no extra edge, no double count."""
    seen = store.query_rows("SELECT count() FROM calls WHERE dst_service = 'accounts'")[0][0]
    assert seen == 3 * gt.ACCOUNTS_N + 500 + 2 * gt.REPORTS_N
    into = model.edges[model.edges["callee"] == "accounts"]
    assert dict(zip(into["caller"], into["n"])) == {"frontend": gt.ACCOUNTS_N, "cron": 500, "reports": gt.REPORTS_N}
    assert into.set_index("caller").loc["reports", "observer"] == "otlp"


def test_edges_fall_back_to_the_server_then_the_wire_observer(model):
    assert edge(model, "cron", "accounts")["observer"] == "server"
    assert edge(model, "legacy-batch", "payments")["observer"] == "wire"


def test_error_rate_and_quantiles_match_direct_sql(model, store):
    e = edge(model, "frontend", "catalog")
    errors, p50 = store.query_rows(
        "SELECT countIf(status >= 500 OR error != ''), quantileExact(0.5)(duration_ns) / 1e6 FROM calls "
        "WHERE observer = 'client' AND dst_service = 'catalog'")[0]
    assert e["errors"] == errors and e["error_rate"] == pytest.approx(errors / gt.CATALOG_N)
    assert e["p50_ms"] == pytest.approx(p50, rel=0.05)
    assert e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["p999_ms"]
    assert e["rate_per_s"] == pytest.approx(gt.CATALOG_N / gt.SPAN_S)


def test_thin_edges_say_their_tail_cannot_be_trusted(model):
    assert edge(model, "frontend", "search")["confidence"] == "p99.9 none, p99 none"


def test_routes_are_templated_from_numeric_uuid_hex_and_high_cardinality_segments(model):
    routes = set(zip(model.routes["callee"], model.routes["route"]))
    assert {("catalog", "/products/{id}"), ("cart", "/cart/{id}"), ("inventory", "/stock/{id}"),
            ("accounts", "/users/{id}"), ("checkout", "/orders"), ("notifications", "/events/stream")} <= routes
    assert len(model.routes) == 12


@pytest.mark.parametrize("path, route", [
    ("/users/8812/orders/5f3c9a1b22", "/users/{id}/orders/{id}"),
    ("/a/1/2", "/a/{id}/{id}"),
    ("/x/123e4567-e89b-12d3-a456-426614174000/y", "/x/{id}/y"),
    ("/products", "/products"),
    ("/v1/orders", "/v1/orders"),
])
def test_static_templating(store, path, route):
    from meshlens.analysis.routes import static_sql
    from meshlens.analysis.window import quote

    assert store.query_rows(f"SELECT {static_sql(quote(path))}")[0][0] == route


def test_depth_and_timeseries(model, store):
    depth = downstream_depth(model.edges)
    assert depth["frontend"] == 2 and depth["catalog"] == 1 and depth["inventory"] == 0
    ts = timeseries(open_scope(store, gt.WINDOW, "catalog"), 60)
    assert ts["n"].sum() == gt.CATALOG_N + 15_000


@pytest.mark.parametrize("src_service, src_addr, caller", [
    ("cart", "10.0.0.5", "cart"),
    ("10.1.2.3:41234", "10.1.2.3", "10.1.2.3"),     # the tap's stand-in name: one caller per IP, not per port
    ("[fd00::1]:8080", "fd00::1", "fd00::1"),
    ("", "10.1.2.3", "10.1.2.3"),
    ("", "", "(unknown)"),
    ("cafe", "10.1.2.3", "cafe"),                   # hex-looking names are still names
])
def test_callers_the_recorder_could_not_name_are_named_by_ip(store, src_service, src_addr, caller):
    from meshlens.analysis.window import CALLER_SQL, quote

    sql = f"SELECT {CALLER_SQL} FROM (SELECT {quote(src_service)} AS src_service, {quote(src_addr)} AS src_addr)"
    assert store.query_rows(sql)[0][0] == caller


def test_call_levels_put_callers_before_callees_and_cut_cycles():
    from meshlens.analysis.graph import call_levels

    assert call_levels([("web", "api"), ("api", "db"), ("web", "db"), ("cron", "db")]) == \
        {"web": 0, "cron": 0, "api": 1, "db": 2}
    assert call_levels([("a", "b"), ("b", "c"), ("c", "a"), ("a", "a")]) == {"a": 2, "b": 0, "c": 1}
    assert call_levels([]) == {}

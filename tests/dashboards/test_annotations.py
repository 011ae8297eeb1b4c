"""The control plane's changes as annotations (dashboards/annotations.py): each query run as the plugin would on
our own traffic and changes (tests/dashboards/traffic.py CHANGES, shipped through POST /v1/changes), read as
transcripts: the dashboard's service in, the marks Grafana would draw out."""
from __future__ import annotations

from typing import Any

import pytest

from meshlens.dashboards import load_all
from meshlens.dashboards.annotations import COLORS
from meshlens.dashboards.model import CLICKHOUSE, FORMAT_TABLE
from tests.dashboards.macros import expand
from tests.dashboards.runner import describe, resolve_variables, run, time_range
from tests.dashboards.traffic import RESHIPPED

DASHBOARDS = load_all()
NAMES = ["Mode switches", "Policy changes", "Automatic rollbacks"]
# The dashboards marked with the changes, and the variable that says which service they are about.
MARKED = {"meshlens-service": "service", "meshlens-edge": "dst", "meshlens-dryrun": "service"}
PAYMENTS_POLICIES = [
    "VirtualService default/payments created (payments) by ana (revision 8): send 10% to v2",
    "DestinationRule default/payments configured (payments) by ana (revision 9): eject failing instances",
    "AuthorizationPolicy default/payments-deny created (payments) by bo (revision 10)",
    "LocalRateLimit payments created (payments) by bo (revision 11): protect the card processor",
    "PeerAuthentication default/default created (every service) by bo (revision 12): PERMISSIVE everywhere first",
    "VirtualService default/checkout created (payments,search) by ana (revision 13): one route for checkout",
]
MESH_WIDE = PAYMENTS_POLICIES[4]


def annotations(uid: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in DASHBOARDS[uid]["annotations"]["list"] if not a.get("builtIn")}


def marks(own_store, uid: str, name: str, **pick: str) -> list[dict[str, Any]]:
    """The rows Grafana gets for one annotation query of `uid`, its variables picked (else as Grafana resolves)."""
    store = own_store.store
    tr = time_range(store)
    variables = resolve_variables(store, DASHBOARDS[uid], tr, pick)
    return run(store, annotations(uid)[name]["target"]["rawSql"], variables, tr).to_pylist()


def texts(own_store, uid: str, name: str, **pick: str) -> list[str]:
    return [m["text"] for m in marks(own_store, uid, name, **pick)]


@pytest.mark.parametrize("uid", sorted(MARKED))
def test_the_service_edge_and_dry_run_dashboards_carry_the_three_queries(uid: str) -> None:
    found = annotations(uid)
    assert list(found) == NAMES
    builtin = DASHBOARDS[uid]["annotations"]["list"][0]
    assert builtin["builtIn"] == 1 and builtin["datasource"]["type"] == "grafana"
    assert len({a["iconColor"] for a in found.values()}) == 3 and found["Automatic rollbacks"]["iconColor"] == "red"
    for a in found.values():
        assert a["datasource"] == CLICKHOUSE and a["enable"] is True and a["iconColor"] == COLORS[a["name"]]
        target = a["target"]
        assert (target["editorType"], target["format"], target["datasource"]) == ("sql", FORMAT_TABLE, CLICKHOUSE)
        assert "FROM ${database}.mesh_changes FINAL" in target["rawSql"]
        assert f"'${{{MARKED[uid]}}}'" in target["rawSql"], "scoped by the dashboard's service"


def test_the_other_dashboards_carry_none() -> None:
    assert {uid for uid in DASHBOARDS if annotations(uid)} == set(MARKED)


@pytest.mark.parametrize("uid, name", [(u, n) for u in sorted(MARKED) for n in NAMES])
def test_each_query_gives_grafana_a_time_a_title_a_text_and_tags(own_store, uid: str, name: str) -> None:
    store = own_store.store
    tr = time_range(store)
    pick = {"src": "web", "dst": "payments"} if uid == "meshlens-edge" else {"service": "payments"}
    sql = expand(annotations(uid)[name]["target"]["rawSql"], resolve_variables(store, DASHBOARDS[uid], tr, pick), tr)
    types = describe(store, sql)
    assert list(types) == ["time", "title", "text", "tags"]
    assert types["time"].startswith("DateTime64") and {types[c] for c in ("title", "text", "tags")} == {"String"}
    assert store.query_arrow(sql).num_rows > 0


def test_mode_switches_are_the_switches_people_made(own_store) -> None:
    got = marks(own_store, "meshlens-service", "Mode switches", service="payments")
    assert [(m["title"], m["text"], m["tags"]) for m in got] == [
        ("mode switch", "payments: observe -> dry-run by ana (revision 7): try retries, timeouts and v2",
         "Mode,payments"),
        ("mode switch", "payments: dry-run -> enforce by ana (revision 14): dry-run looked right", "Mode,payments")]
    assert texts(own_store, "meshlens-service", "Mode switches", service="db") == [
        "db: observe -> dry-run by ana (revision 3): try retries on db",
        "db: dry-run -> enforce by ana (revision 4)",
        "db: enforce -> dry-run by ana (revision 5): too early: back to dry-run"]
    # api's Mode was created in observe, the mode it was in: nothing switched
    assert texts(own_store, "meshlens-service", "Mode switches", service="api") == []


def test_the_guards_rollback_is_its_own_mark(own_store) -> None:
    got = marks(own_store, "meshlens-service", "Automatic rollbacks", service="payments")
    assert [(m["title"], m["text"]) for m in got] == [
        ("automatic rollback",
         "payments: enforce -> dry-run by meshlens-guard (revision 15): "
         "guard: 9.1% failed in enforce, 1.2% in dry-run")]
    # a person switching db from enforce back to dry-run is a mode switch, not an automatic rollback
    assert texts(own_store, "meshlens-service", "Automatic rollbacks", service="db") == []


def test_policy_changes_name_the_resource_and_the_reason(own_store) -> None:
    """payments' own, the mesh-wide one, and one about payments among others; not db's, not one from before the
    range."""
    assert texts(own_store, "meshlens-service", "Policy changes", service="payments") == PAYMENTS_POLICIES
    assert texts(own_store, "meshlens-service", "Policy changes", service="db") == [
        "VirtualService default/db created (db) by ana (revision 6): db timeout", MESH_WIDE]
    assert texts(own_store, "meshlens-service", "Policy changes", service="search") == PAYMENTS_POLICIES[4:]
    assert texts(own_store, "meshlens-service", "Policy changes", service="api") == [MESH_WIDE]
    tags = [m["tags"] for m in marks(own_store, "meshlens-service", "Policy changes", service="payments")]
    assert tags[4:] == ["PeerAuthentication", "VirtualService,payments,search"]


def test_a_change_before_the_range_is_not_marked(own_store) -> None:
    store = own_store.store
    assert store.query_rows("SELECT name FROM meshlens.mesh_changes FINAL WHERE revision = 1") == [
        ("default/payments",)], "revision 1 is stored"
    assert not any("(revision 1)" in t for t in texts(own_store, "meshlens-service", "Policy changes",
                                                       service="payments"))


def test_a_change_stored_twice_is_marked_once(own_store) -> None:
    """A second collector stored revision 14 again (tests/dashboards/conftest.py): the rows stay two until
    ClickHouse merges their parts, and the marks are one."""
    assert RESHIPPED == 14
    rows = own_store.store.query_rows("SELECT count() FROM meshlens.mesh_changes WHERE revision = 14")
    assert rows == [(2,)], "both copies are still in the table (the parts have not merged)"
    got = texts(own_store, "meshlens-dryrun", "Mode switches", service="payments")
    assert [t for t in got if "(revision 14)" in t] == [
        "payments: dry-run -> enforce by ana (revision 14): dry-run looked right"]


def test_the_edge_is_marked_with_its_callees_changes(own_store) -> None:
    """The callee's mode and policies govern the calls to it; the caller's do not."""
    for name in NAMES:
        assert texts(own_store, "meshlens-edge", name, src="web", dst="payments") == texts(
            own_store, "meshlens-service", name, service="payments"), name
        assert texts(own_store, "meshlens-edge", name, src="api", dst="db") == texts(
            own_store, "meshlens-service", name, service="db"), name
    assert texts(own_store, "meshlens-edge", "Policy changes", src="web", dst="search") == PAYMENTS_POLICIES[4:]

"""Every ClickHouse panel query, expanded as Grafana and the plugin would, runs on real traffic and has the
columns its panel type needs."""
from __future__ import annotations

import re

import pytest

from meshlens.dashboards import load_all
from tests.dashboards.macros import ALL, Variable, expand
from tests.dashboards.runner import (Target, analysis_scope, clickhouse_targets, describe, resolve_variables, run,
                                     time_range)

DASHBOARDS = load_all()
TARGETS = clickhouse_targets(DASHBOARDS)
# Dashboards checked against calls in every mode with planned counts, which only our own traffic has:
# their panels run on `own_store`, each with the variables picked here.
OWN_TRAFFIC = {"meshlens-dryrun": {"service": "payments"}}
# Panels whose emptiness is a finding, not a failure: a mesh may have no unmeshed caller.
MAY_BE_EMPTY = {"meshlens-readiness:Unmeshed callers:A"}
# The trace view's columns and the ClickHouse types that feed them.
TRACE_VIEW = {"traceID": "String", "spanID": "String", "parentSpanID": "String",
              "serviceName": "LowCardinality(String)", "operationName": "LowCardinality(String)",
              "startTime": "DateTime64(9)", "duration": "Float64",
              "tags": "Array(Map(String, String))", "serviceTags": "Array(Map(String, String))"}


def _bare(t: str) -> str:
    for wrapper in ("Nullable", "LowCardinality"):
        if t.startswith(wrapper + "("):
            t = t[len(wrapper) + 1:-1]
    return t


def _numeric(t: str) -> bool:
    return bool(re.match(r"(U?Int\d+|Float\d+|Decimal)", _bare(t)))


def _text(t: str) -> bool:
    return _bare(t) == "String"


def _time(t: str) -> bool:
    return _bare(t).startswith("DateTime")


@pytest.fixture(scope="module")
def context(panel_store):
    tr = time_range(panel_store.store)
    variables = {uid: resolve_variables(panel_store.store, d, tr) for uid, d in DASHBOARDS.items()
                 if uid not in OWN_TRAFFIC}
    return panel_store.store, tr, variables


@pytest.fixture(scope="module")
def own_context(own_store):
    tr = time_range(own_store.store)
    variables = {uid: resolve_variables(own_store.store, DASHBOARDS[uid], tr, pick)
                 for uid, pick in OWN_TRAFFIC.items()}
    return own_store.store, tr, variables


def check_columns(t: Target, types: dict[str, str]) -> None:
    kind, fmt = t.panel["type"], t.target["format"]
    names = list(types)
    if fmt == 0:
        assert names[0] == "time" and _time(types["time"]), (t.name, types)
        values = [n for n in names if n != "time"]
        assert any(_numeric(types[n]) for n in values), (t.name, types)
        assert all(_numeric(types[n]) or _text(types[n]) for n in values), (t.name, types)
    if kind == "heatmap":
        bounds = [n for n in names if n != "time"]
        assert bounds[-1] == "+Inf" and all(float(b) > 0 for b in bounds[:-1]), bounds
        assert [float(b) for b in bounds[:-1]] == sorted(float(b) for b in bounds[:-1])
    if kind in ("piechart", "barchart"):
        assert any(_text(v) for v in types.values()) and any(_numeric(v) for v in types.values()), (t.name, types)
    if kind == "stat":
        fields = t.panel["options"]["reduceOptions"]["fields"]
        wanted = [n for n in names if re.search(fields.strip("/"), n)] if fields else [
            n for n in names if _numeric(types[n])]
        assert wanted, (t.name, types)
    if kind == "nodeGraph":
        need = {"nodes": {"id", "title", "mainstat", "arc__ok", "arc__failed"},
                "edges": {"id", "source", "target", "mainstat"}}[t.target["refId"]]
        assert need <= set(names), (t.name, types)
    if fmt == 3:
        for col, typ in TRACE_VIEW.items():
            assert types.get(col) == typ, (t.name, col, types)


@pytest.mark.parametrize("t", TARGETS, ids=[t.name for t in TARGETS])
def test_panel_query_runs_and_fits_its_panel(t: Target, request: pytest.FixtureRequest) -> None:
    store, tr, variables = request.getfixturevalue("own_context" if t.dashboard in OWN_TRAFFIC else "context")
    sql = expand(t.target["rawSql"], variables[t.dashboard], tr)
    check_columns(t, describe(store, sql))
    table = store.query_arrow(sql)
    if t.name not in MAY_BE_EMPTY:
        assert table.num_rows > 0, f"{t.name} returned no rows"
    if t.panel["type"] == "nodeGraph" and t.target["refId"] == "nodes":
        arcs = [a + b for a, b in zip(table.column("arc__ok").to_pylist(), table.column("arc__failed").to_pylist())]
        assert all(abs(a - 1) < 1e-9 for a in arcs)


def test_node_graph_edges_join_its_nodes(context) -> None:
    store, tr, variables = context
    panel = next(p for p in DASHBOARDS["meshlens-overview"]["panels"] if p["type"] == "nodeGraph")
    q = {t["refId"]: run(store, t["rawSql"], variables["meshlens-overview"], tr) for t in panel["targets"]}
    ids = set(q["nodes"].column("id").to_pylist())
    edges = q["edges"].to_pylist()
    assert edges and all(e["source"] in ids and e["target"] in ids for e in edges)


def test_the_trace_panel_shows_one_whole_trace(context) -> None:
    store, tr, variables = context
    dash = DASHBOARDS["meshlens-traces"]
    trace_id = variables["meshlens-traces"]["trace_id"].value
    panel = next(p for p in dash["panels"] if p["type"] == "traces")
    spans = run(store, panel["targets"][0]["rawSql"], variables["meshlens-traces"], tr).to_pylist()
    assert spans and {s["traceID"] for s in spans} == {trace_id}
    ids = {s["spanID"] for s in spans}
    roots = [s for s in spans if s["parentSpanID"] == "" or s["parentSpanID"] not in ids]
    assert roots, "a trace has a root"
    assert all({k for k, _ in kv} == {"key", "value"} for s in spans for kv in s["tags"])


def test_the_overview_counts_what_analysis_counts(context) -> None:
    """Observer auto: per service, the calls analysis sees (one observer per edge, copies dropped)."""
    store, tr, variables = context
    panel = next(p for p in DASHBOARDS["meshlens-overview"]["panels"] if p["title"] == "Services")
    shown = {r["service"]: r["calls"] for r in
             run(store, panel["targets"][0]["rawSql"], variables["meshlens-overview"], tr).to_pylist()}
    scope = analysis_scope(store, tr)
    expected = {d: int(n) for d, n in store.query_rows(
        f"SELECT toString(dst_service) AS d, count() FROM {scope.calls()} GROUP BY d")}
    assert shown == expected
    total = int(store.query_rows(f"SELECT count() FROM calls WHERE {scope.window.where()}")[0][0])
    assert total > sum(expected.values()), "the traffic has exchanges seen by several observers"


def test_the_service_detail_counts_what_analysis_counts(context) -> None:
    """Service side (server first) for the service's own latency, as analysis' SERVICE_SIDE."""
    from meshlens.analysis.window import SERVICE_SIDE, quote

    store, tr, variables = context
    v = variables["meshlens-service"]
    panel = next(p for p in DASHBOARDS["meshlens-service"]["panels"] if p["title"] == "Latency per route")
    shown = sum(run(store, panel["targets"][0]["rawSql"], v, tr).column("calls").to_pylist())
    scope = analysis_scope(store, tr)
    expected = int(store.query_rows(f"SELECT count() FROM {scope.calls(SERVICE_SIDE)} "
                                    f"WHERE dst_service = {quote(v['service'].value)}")[0][0])
    assert shown == expected


def test_one_named_observer_and_one_selected_service(context) -> None:
    store, tr, variables = context
    v = dict(variables["meshlens-overview"])
    services = v["service"].options[1:]
    v["service"] = Variable("service", [services[0]], [ALL, *services])
    v["observer"] = Variable("observer", "server", [])
    panel = next(p for p in DASHBOARDS["meshlens-overview"]["panels"] if p["title"] == "Services")
    rows = run(store, panel["targets"][0]["rawSql"], v, tr).to_pylist()
    assert [r["service"] for r in rows] == [services[0]] or rows == []


def test_readiness_verdicts_are_the_recommendations(context) -> None:
    """The mTLS table says what `meshlens recommend` says, service by service."""
    from meshlens.analysis.mtls import recommend_mtls

    store, tr, variables = context
    panel = next(p for p in DASHBOARDS["meshlens-readiness"]["panels"] if p["title"] == "mTLS readiness per service")
    shown = {r["callee"]: r["verdict"] for r in
             run(store, panel["targets"][0]["rawSql"], variables["meshlens-readiness"], tr).to_pylist()}
    recs = {r.target["callee"]: r for r in recommend_mtls(analysis_scope(store, tr))}
    assert set(shown) == set(recs)
    for callee, rec in recs.items():
        if rec.policy is None:
            assert shown[callee].startswith("not enough data"), (callee, shown[callee])
        else:
            assert shown[callee] == rec.policy["verdict"], (callee, shown[callee], rec.policy)

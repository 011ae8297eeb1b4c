"""The committed dashboard JSON: built from the definitions, and well-formed as Grafana and the plugin read it."""
from __future__ import annotations

import re
from typing import Any

import pytest

from meshlens.analysis import mtls, retries, route_stats, scope, timeouts, window
from meshlens.dashboards import JSON_DIR, dryrun, load_all, readiness, sql
from meshlens.dashboards.build import build_all, render
from meshlens.dashboards.model import CLICKHOUSE_PLUGIN, PANEL_FORMATS, QUERY_TYPE, SCHEMA_VERSION
from tests.dashboards.runner import panels

DASHBOARDS = load_all()
UIDS = sorted(DASHBOARDS)
# Grafana's own variables, which need no definition.
BUILTIN = re.compile(r"__\w+")
VAR_REF = re.compile(r"\$(\w+)|\[\[(\w+?)(?::\w+)?\]\]|\$\{(\w+)(?:\.[^:^}]+)?(?::[^}]+)?\}")
NO_ARG_MACROS = ("$__interval_s", "$__fromTime", "$__toTime", "$__fromTime_ms", "$__toTime_ms")


def annotation_queries(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's own annotation queries (not Grafana's built-in one)."""
    return [a for a in d["annotations"]["list"] if not a.get("builtIn")]


def sql_texts(d: dict[str, Any]) -> list[str]:
    """Every SQL text Grafana sends for the dashboard: panels', variables' and annotations'."""
    texts = [t.get("rawSql", "") + t.get("expr", "") for p in panels(d) for t in p.get("targets", [])]
    texts += [v["query"]["rawSql"] for v in d["templating"]["list"] if v["type"] == "query"]
    return texts + [a["target"]["rawSql"] for a in annotation_queries(d)]


def test_committed_json_is_the_builders_output() -> None:
    built = build_all()
    assert sorted(built) == sorted(p.stem for p in JSON_DIR.glob("*.json"))
    for uid, dash in built.items():
        assert (JSON_DIR / f"{uid}.json").read_text() == render(dash), f"run python -m meshlens.dashboards.build ({uid})"


def test_the_expected_dashboards() -> None:
    assert UIDS == ["meshlens-dryrun", "meshlens-edge", "meshlens-overview", "meshlens-readiness", "meshlens-self",
                    "meshlens-service", "meshlens-traces"]
    assert len({d["title"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)


@pytest.mark.parametrize("uid", UIDS)
def test_dashboard_shape(uid: str) -> None:
    d = DASHBOARDS[uid]
    assert d["uid"] == uid and d["schemaVersion"] == SCHEMA_VERSION and d["id"] is None
    assert "meshlens" in d["tags"] and d["time"]["to"] == "now"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    names = [v["name"] for v in d["templating"]["list"]]
    assert len(names) == len(set(names)), "variable names are unique"


def _grid_cells(p: dict[str, Any]) -> set[tuple[int, int]]:
    g = p["gridPos"]
    assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
    return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}


@pytest.mark.parametrize("uid", UIDS)
def test_panels_do_not_overlap(uid: str) -> None:
    seen: set[tuple[int, int]] = set()
    for p in panels(DASHBOARDS[uid]):
        cells = _grid_cells(p)
        assert not cells & seen, p["title"]
        seen |= cells


def _datasource_vars(d: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["query"] for v in d["templating"]["list"] if v["type"] == "datasource"}


@pytest.mark.parametrize("uid", UIDS)
def test_every_datasource_is_a_datasource_variable_of_its_type(uid: str) -> None:
    d = DASHBOARDS[uid]
    ds_vars = _datasource_vars(d)
    refs = [p["datasource"] for p in panels(d) if p["type"] != "row"]
    refs += [t["datasource"] for p in panels(d) for t in p.get("targets", [])]
    refs += [v["datasource"] for v in d["templating"]["list"] if v["type"] == "query"]
    refs += [r for a in annotation_queries(d) for r in (a["datasource"], a["target"]["datasource"])]
    assert refs
    for ref in refs:
        m = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
        assert m and m.group(1) in ds_vars, ref
        assert ds_vars[m.group(1)] == ref["type"], ref


@pytest.mark.parametrize("uid", UIDS)
def test_every_referenced_variable_exists(uid: str) -> None:
    d = DASHBOARDS[uid]
    defined = {v["name"] for v in d["templating"]["list"]}
    texts = [p.get("title", "") for p in panels(d)] + sql_texts(d)
    used = {next(g for g in m.groups() if g) for text in texts for m in VAR_REF.finditer(text)}
    missing = {u for u in used if not BUILTIN.fullmatch(u)} - defined
    assert not missing
    # Variables a query refers to are defined before it (Grafana resolves them in order).
    order = [v["name"] for v in d["templating"]["list"]]
    for i, v in enumerate(d["templating"]["list"]):
        if v["type"] == "query":
            refs = {next(g for g in m.groups() if g) for m in VAR_REF.finditer(v["query"]["rawSql"])}
            assert {r for r in refs if not BUILTIN.fullmatch(r)} <= set(order[:i]), v["name"]


@pytest.mark.parametrize("uid", UIDS)
def test_formats_fit_panel_types(uid: str) -> None:
    for p in panels(DASHBOARDS[uid]):
        for t in p.get("targets", []):
            if t["datasource"]["type"] != CLICKHOUSE_PLUGIN:
                assert "expr" in t and "rawSql" not in t
                continue
            assert t["editorType"] == "sql" and t["rawSql"].strip()
            assert t["format"] in PANEL_FORMATS[p["type"]], (p["title"], t["format"])
            assert t["queryType"] == QUERY_TYPE[t["format"]]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs))
    for a in annotation_queries(DASHBOARDS[uid]):  # Grafana reads an annotation's result as a table
        t = a["target"]
        assert (t["editorType"], t["format"], t["queryType"]) == ("sql", 1, "table") and t["rawSql"].strip()


def test_the_traces_dashboard_uses_the_trace_format() -> None:
    kinds = {p["type"]: p for p in panels(DASHBOARDS["meshlens-traces"])}
    assert kinds["traces"]["targets"][0]["format"] == 3
    assert kinds["table"]["targets"][0]["format"] == 1


@pytest.mark.parametrize("uid", UIDS)
def test_macros_without_arguments_are_closed_by_a_parenthesis(uid: str) -> None:
    """sqlutil takes the text up to the next '(...)' as a macro's arguments unless ')' comes first."""
    for sql_text in sql_texts(DASHBOARDS[uid]):
        for macro in NO_ARG_MACROS:
            for m in re.finditer(re.escape(macro) + r"\b", sql_text):
                rest = sql_text[m.end():]
                first = re.search(r"[()]", rest)
                assert first is not None and first.group() == ")", (sql_text[:80], macro)


def test_sql_constants_match_analysis() -> None:
    assert sql.CALLER_SIDE == window.CALLER_SIDE
    assert sql.SERVICE_SIDE == window.SERVICE_SIDE
    assert sql.CALLER == window.CALLER_SQL
    assert sql.UNNAMED == window.UNNAMED_SQL
    assert sql.OUTSIDE_OBSERVERS == window.OUTSIDE_OBSERVERS
    assert sql.FAILED == scope.FAILED_SQL
    assert sql.HEALTHY == scope.HEALTHY_SQL
    assert readiness.MTLS_MIN_N == mtls.MTLS_MIN_N
    assert readiness.TIMEOUT_HEADROOM == timeouts.HEADROOM
    assert readiness.TRANSIENT == route_stats.TRANSIENT_SQL
    assert readiness.IDEMPOTENT_METHODS == retries.IDEMPOTENT_METHODS


def test_the_callee_words_are_the_inbound_policies_words() -> None:
    """dashboards/dryrun.py counts these on the callee's row: the words proxy/policies.py's Authorization and
    RateLimit and the PeerAuthentication check write, enforced and in dry-run (proxy/chain.py WOULD)."""
    from meshlens.proxy.chain import WOULD

    inbound = ("denied", "rate_limited", "refused_plaintext")
    assert set(dryrun.CALLEE_WORDS) == {*inbound, *(WOULD[a] for a in inbound), "audited"}


def test_every_calls_query_picks_one_observer_or_shows_them_apart() -> None:
    """Never double count: a query over calls applies the observer rule, or groups by observer, or
    asks which observers saw a caller (readiness)."""
    for uid in UIDS:
        for p in panels(DASHBOARDS[uid]):
            for t in p.get("targets", []):
                text = t.get("rawSql", "")
                if ".calls" not in text:
                    continue
                rule = "argMin(toString(observer), indexOf(" in text
                per_observer = "GROUP BY observer" in text
                who_saw = "groupUniqArray(toString(observer))" in text or "mode" in text.split("FROM")[0]
                assert rule or per_observer or who_saw, (uid, p["title"])

"""gRPC calls in analysis: a 200 carrying a server error is a failure everywhere failures are counted, and a
gRPC route is retried only on UNAVAILABLE before a response (the server did not process it).

The calls are written the way the tap writes a gRPC stream (tap/calls.py): protocol grpc, the method path as
method, route and path, HTTP status 200, the grpc-status in `grpc_status`, no response message when the server
answered trailers-only. Every figure checked is a direct count over the rows, or fixed here.
"""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from meshlens.analysis import istio_yaml, open_scope, recommend
from meshlens.analysis.distributions import error_classes
from meshlens.analysis.graph import edges, routes
from meshlens.analysis.mode_figures import by_mode
from meshlens.analysis.retries import GRPC_RETRY_ON, GRPC_SAFE
from meshlens.analysis.scope import FAILED_SQL, HEALTHY_SQL
from meshlens.analysis.whatif import breaker_whatif, for_recommendation, timeout_whatif
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.spans import GRPC_SERVER_ERRORS
from meshlens.collector.stores.embedded import EmbeddedStore
from meshlens.policy.resources import parse_documents
from tests.analysis import traffic as gt

GET, CHARGE, REFUND = "/shop.Inventory/Get", "/shop.Payment/Charge", "/shop.Payment/Refund"
INVENTORY = [f"10.0.2.{i}:50051" for i in range(1, 5)]
BAD = "10.0.2.3:50051"       # fails UNAVAILABLE on 20% of its calls: 5% of Get's calls
GET_N, BAD_RATE = 6000, 0.20
NOT_FOUND_RATE = 0.01        # the caller's fault (as a 404): no failure
LATE_UNAVAILABLE = 40        # UNAVAILABLE after a response message: a failure, too late to retry
CHARGE_N, DEADLINE_RATE, DEADLINE_S = 3000, 0.03, 1.0
HEALTHY_TAIL_S = 0.2         # no successful Charge is slower
REFUND_N, CANCELLED_RATE = 600, 0.02
CATALOG_METHODS = 25         # one service, many methods, seen only in spans (route left empty)
MARK = 599                   # Traffic.add's failure status, replaced by the gRPC status below
CLIENT = f"observer = 'client' AND {gt.WINDOW.where()}"


def _grpc(tr: gt.Traffic, out: dict[str, list], n: int, src: str, dst: str, method: str, code: int, *,
          fail=None, bad=None, instances: list[str], observer: str = "client", route: bool = True,
          deadline_s: float | None = None) -> None:
    """n gRPC calls: the failed ones answered 200 trailers-only with `code`, the others OK with a message."""
    start = len(tr.cols.get("time", []))
    tr.add(n, src, dst, method, method, (30, 0.4, HEALTHY_TAIL_S * 1000), fail=fail, fail_status=MARK, bad=bad,
           instances=instances, observer=observer)
    failed = np.array(tr.cols["status"][start:]) == MARK
    tr.cols["status"][start:] = [200] * n
    if deadline_s is not None:
        tr.cols["duration_ns"][start:] = [int(deadline_s * 1e9) if f else d
                                          for f, d in zip(failed, tr.cols["duration_ns"][start:])]
    out["protocol"] += ["grpc"] * n
    out["route"] += [method if route else ""] * n
    out["grpc_status"] += [code if f else 0 for f in failed]
    out["response_bytes"] += [0 if f else 64 for f in failed]


def _http(tr: gt.Traffic, out: dict[str, list], *args, **kwargs) -> None:
    start = len(tr.cols.get("time", []))
    tr.add(*args, **kwargs)
    n = len(tr.cols["time"]) - start
    out["protocol"] += ["http/1.1"] * n
    out["route"] += [""] * n
    out["grpc_status"] += [-1] * n
    out["response_bytes"] += [512] * n


def generate(store: EmbeddedStore) -> None:
    migrate(store, Layout())
    store.use_database()
    tr = gt.Traffic(seed=15)
    rng = tr.rng
    out: dict[str, list] = {"protocol": [], "route": [], "grpc_status": [], "response_bytes": []}
    _grpc(tr, out, GET_N, "cart", "inventory", GET, 14, bad=(BAD, BAD_RATE), instances=INVENTORY)
    # Of Get's calls that did not fail: some NOT_FOUND (trailers-only, the caller's fault), and a few
    # UNAVAILABLE after a response message had been sent.
    ok = [i for i in range(GET_N) if out["grpc_status"][i] == 0]
    picked = rng.choice(ok, int(NOT_FOUND_RATE * GET_N) + LATE_UNAVAILABLE, replace=False)
    for j, i in enumerate(picked):
        out["grpc_status"][i] = 14 if j < LATE_UNAVAILABLE else 5
        out["response_bytes"][i] = 64 if j < LATE_UNAVAILABLE else 0
    _grpc(tr, out, CHARGE_N, "cart", "payment", CHARGE, 4, fail=rng.uniform(size=CHARGE_N) < DEADLINE_RATE,
          instances=["10.0.4.1:50051", "10.0.4.2:50051"], deadline_s=DEADLINE_S)
    _grpc(tr, out, REFUND_N, "cart", "payment", REFUND, 1, fail=rng.uniform(size=REFUND_N) < CANCELLED_RATE,
          instances=["10.0.4.1:50051", "10.0.4.2:50051"])
    for m in range(CATALOG_METHODS):
        _grpc(tr, out, 20, "search", "catalog", f"/shop.Catalog/Method{m:02d}", 0, instances=["10.0.1.1:50051"],
              observer="otlp", route=False)
    _http(tr, out, 2000, "frontend", "cart", "GET", lambda i: f"/cart/{rng.integers(1, 10**6)}", (15, 0.5, 100),
          instances=["10.0.3.1:8080"])
    tr.cols |= out
    tr.write(store)


@pytest.fixture(scope="module")
def grpc_store(tmp_path_factory):
    s = EmbeddedStore(tmp_path_factory.mktemp("grpc") / "chdb")
    generate(s)
    yield s
    s.close()


@pytest.fixture(scope="module")
def scope(grpc_store):
    return open_scope(grpc_store, gt.WINDOW)


@pytest.fixture(scope="module")
def report(grpc_store, scope):
    return recommend(grpc_store, gt.WINDOW, scope=scope)


def count(store, where: str) -> int:
    return int(store.query_rows(f"SELECT count() FROM calls WHERE {CLIENT} AND {where}")[0][0])


def pick(report, kind, **target):
    [found] = [r for r in report.recommendations if r.kind == kind
               and all(r.target.get(k) == v for k, v in target.items())]
    return found


def test_failed_is_a_server_error_of_grpc_as_opentelemetry_and_envoy_count_it(grpc_store):
    """Every gRPC code under FAILED_SQL and HEALTHY_SQL, beside HTTP's answers: one is the other's negation."""
    rows = grpc_store.query_rows(f"""SELECT grpc_status, status, error, {FAILED_SQL}, {HEALTHY_SQL} FROM (
        SELECT toInt16(arrayJoin(range(-1, 17))) AS grpc_status, toUInt16(arrayJoin([0, 200, 404, 503])) AS status,
               arrayJoin(['', 'reset']) AS error)""")
    for code, status, error, failed, healthy in rows:
        assert bool(failed) != bool(healthy)
        assert bool(failed) == (error != "" or status >= 500 or code in GRPC_SERVER_ERRORS), (code, status, error)


def test_a_200_with_unavailable_fails_in_the_graph_and_its_edges_say_grpc(grpc_store, scope):
    e = edges(scope).set_index(["caller", "callee"])
    unavailable = count(grpc_store, "dst_service = 'inventory' AND grpc_status = 14")
    assert unavailable > GET_N * 0.03
    assert e.loc[("cart", "inventory"), "errors"] == unavailable  # NOT_FOUND is the caller's: not counted
    assert e.loc[("cart", "inventory"), "error_rate"] == pytest.approx(unavailable / GET_N)
    assert e.loc[("cart", "payment"), "errors"] == count(grpc_store, "dst_service = 'payment' AND grpc_status = 4")
    assert e.loc[("cart", "inventory"), "protocol"] == "grpc"
    assert e.loc[("frontend", "cart"), "protocol"] == "http/1.1"
    assert e.loc[("frontend", "cart"), "errors"] == 0


def test_the_methods_of_an_edge_are_its_grpc_methods_never_templated(scope):
    r = routes(scope)
    assert set(r[r["callee"] == "payment"]["method"]) == {CHARGE, REFUND}
    assert set(r[r["callee"] == "payment"]["route"]) == {CHARGE, REFUND}
    # 25 methods of one service, from spans that carry no route: 25 routes, not /shop.Catalog/{id}
    assert set(r[r["callee"] == "catalog"]["route"]) == {f"/shop.Catalog/Method{m:02d}" for m in
                                                         range(CATALOG_METHODS)}


def test_outlier_detection_ejects_the_instance_answering_unavailable(report):
    r = pick(report, "outlier", callee="inventory")
    assert r.policy is not None and r.policy["eject"] == [BAD]
    assert r.evidence.figures["instances"][BAD]["failure_rate"] == pytest.approx(BAD_RATE, abs=0.04)
    assert r.policy["consecutiveGatewayErrors"] > 0  # UNAVAILABLE is a 503 to Envoy's detector


def test_unavailable_is_retried_and_the_evidence_says_why(grpc_store, report):
    r = pick(report, "retry", caller="cart", method=GET)
    assert r.policy is not None and r.policy["retryOn"] == GRPC_RETRY_ON
    transient = count(grpc_store, f"method = '{GET}' AND grpc_status = 14 AND response_bytes = 0")
    assert r.evidence.figures["transient"] == transient
    assert f"safe: {GRPC_SAFE}" in r.evidence.reason
    assert r.evidence.figures["grpc_not_retried"] == {"UNAVAILABLE": LATE_UNAVAILABLE}
    assert (f"not retried: {LATE_UNAVAILABLE} UNAVAILABLE (14): UNAVAILABLE after a response message"
            in r.evidence.reason)


def test_deadline_exceeded_is_not_retried(report):
    r = pick(report, "retry", caller="cart", method=CHARGE)
    assert r.policy is None and not r.evidence.figures.get("retries_off")
    assert r.evidence.reason.startswith("no retries: ") and "DEADLINE_EXCEEDED (4): the work may have been done" \
        in r.evidence.reason and GRPC_SAFE in r.evidence.reason


def test_cancelled_calls_turn_istios_default_retries_off(report):
    r = pick(report, "retry", caller="cart", method=REFUND)
    assert r.policy is None and r.evidence.figures["retries_off"]
    assert "CANCELLED (1)" in r.evidence.reason


def test_a_timeout_is_computed_on_calls_that_met_no_deadline(report):
    r = pick(report, "timeout", caller="cart", method=CHARGE)
    assert r.evidence.figures["max_ok_s"] <= HEALTHY_TAIL_S
    assert r.evidence.figures["max_ok_s"] <= r.policy["timeout_s"] <= 2 * HEALTHY_TAIL_S < DEADLINE_S


def test_deadline_exceeded_is_a_timeout_class_failure(grpc_store, scope):
    df = error_classes(scope)
    payment = df[df["callee"] == "payment"]
    assert dict(zip(payment["error_class"], payment["n"])) == {"timeout": count(grpc_store, "grpc_status = 4"),
                                                              "CANCELLED": count(grpc_store, "grpc_status = 1")}


def test_virtual_service_matches_the_method_path_and_retries_on_unavailable(report):
    text = istio_yaml(report)
    parse_documents(text, "recommend")  # what the control plane would accept as it is
    [inventory] = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "VirtualService"
                   and d["metadata"]["name"] == "inventory"]
    [get] = [h for h in inventory["spec"]["http"] if "match" in h]
    assert get["match"] == [{"uri": {"exact": GET}, "sourceLabels": {"app": "cart"}}]
    assert get["retries"]["retryOn"] == "connect-failure,refused-stream,unavailable"
    assert f"safe: {GRPC_SAFE}" in text
    [payment] = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "VirtualService"
                 and d["metadata"]["name"] == "payment"]
    by_uri = {h["match"][0]["uri"]["exact"]: h for h in payment["spec"]["http"] if "match" in h}
    assert "retries" not in by_uri[CHARGE] and by_uri[CHARGE]["timeout"].endswith("ms")
    assert by_uri[REFUND]["retries"] == {"attempts": 0}


def test_the_whatifs_replay_the_same_failures(grpc_store, scope, report):
    retry = for_recommendation(scope, pick(report, "retry", caller="cart", method=GET))
    assert retry["transient_failures"] == count(grpc_store, f"method = '{GET}' AND grpc_status = 14 "
                                                            "AND response_bytes = 0")
    assert 0 < retry["recovered"] <= retry["transient_failures"]
    breaker = for_recommendation(scope, pick(report, "outlier", callee="inventory"))
    assert sum(i["failed"] for i in breaker["instances"]) == count(grpc_store, "dst_service = 'inventory' AND "
                                                                                "grpc_status = 14")
    assert breaker["ejections"] > 0 and breaker["rejected_failed"] > 0
    gateway = breaker_whatif(scope, 3, callee="inventory", gateway=True)
    assert gateway["trips"].sum() > 0
    cut = timeout_whatif(scope, 0.5, callee="payment").set_index("method")
    assert cut.loc[CHARGE, "cut"] == count(grpc_store, f"method = '{CHARGE}' AND duration_ns > 500000000")
    assert cut.loc[CHARGE, "cut_ok"] == 0  # every call over 0.5 s met its deadline: none succeeded


def test_the_mode_figures_count_grpc_failures(grpc_store, scope):
    [figures] = by_mode(scope, "inventory").values()
    assert (figures.n, figures.failed) == (GET_N, count(grpc_store, "dst_service = 'inventory' AND grpc_status = 14"))

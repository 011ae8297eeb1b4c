"""Recommendations recover the ground truth injected by tests/analysis/traffic.py."""
from __future__ import annotations

import pytest

from meshlens.analysis import Window, open_scope, recommend
from meshlens.analysis.outliers import instance_frame
from meshlens.analysis.retries import IDEMPOTENT_METHODS
from meshlens.analysis.runs import MAX_RUN
from tests.analysis import traffic as gt


@pytest.fixture(scope="module")
def report(store):
    return recommend(store, gt.WINDOW)


def pick(report, kind, **target):
    found = [r for r in report.recommendations if r.kind == kind
             and all(r.target.get(k) == v for k, v in target.items())]
    assert len(found) == 1, (kind, target, found)
    return found[0]


def test_timeout_lies_between_the_healthy_tail_and_twice_it(report):
    r = pick(report, "timeout", caller="frontend", callee="catalog", route="/products/{id}")
    assert gt.HEALTHY_TAIL_S <= r.policy["timeout_s"] <= 2 * gt.HEALTHY_TAIL_S
    assert r.evidence.figures["max_ok_s"] <= r.policy["timeout_s"]


def test_every_timeout_covers_every_successful_call(report):
    for r in report.recommendations:
        if r.kind == "timeout" and r.policy:
            assert r.policy["timeout_s"] >= r.evidence.figures["max_ok_s"]


def test_streaming_routes_are_left_alone(report):
    r = pick(report, "timeout", callee="notifications", route="/events/stream")
    assert r.policy is None and "left alone" in r.evidence.reason


def test_thin_data_is_refused_with_n_and_the_minimum(report):
    for kind in ("timeout", "retry"):
        r = pick(report, kind, callee="search")
        assert r.policy is None and r.evidence.confidence == "none"
        assert r.evidence.reason.startswith(f"not enough data (n={gt.THIN_N}, need ")


def test_no_retry_on_post_without_idempotency_key(report):
    r = pick(report, "retry", caller="frontend", callee="checkout", method="POST")
    assert r.policy is None and "not idempotent" in r.evidence.reason
    assert any("non-idempotent route POST /orders" in w for w in r.warnings)
    for rec in report.recommendations:
        if rec.kind == "retry" and rec.policy:
            assert rec.target["method"] in IDEMPOTENT_METHODS or rec.evidence.figures["keyed"] == rec.evidence.n


def test_post_with_idempotency_key_and_transient_failures_is_retried(report):
    r = pick(report, "retry", caller="checkout", callee="payments")
    assert r.policy is not None and 1 <= r.policy["attempts"] <= 3
    assert "idempotency key" in r.evidence.reason


def test_independent_transient_failures_get_retries_persistent_ones_do_not(report):
    ok = pick(report, "retry", caller="frontend", callee="catalog")
    assert ok.policy["attempts"] >= 1 and ok.policy["perTryTimeout_s"] >= gt.HEALTHY_TAIL_S
    lo, hi = ok.evidence.figures["p_interval_95"]
    assert lo <= 1 - gt.CATALOG_TRANSIENT <= hi + 0.02
    persistent = pick(report, "retry", caller="frontend", callee="cart")
    assert persistent.policy is None and "persistent" in persistent.evidence.reason
    assert persistent.evidence.figures["p_success_on_retry"] < 0.1


def test_retries_at_two_depths_warn_about_amplification(report):
    top = pick(report, "retry", caller="frontend", callee="catalog")
    assert any("amplification" in w and "inventory" in w for w in top.warnings)


def test_the_bad_instance_is_the_one_ejected(report):
    r = pick(report, "outlier", callee="inventory")
    assert r.policy["eject"] == [gt.BAD_INSTANCE]
    assert r.policy["maxEjectionPercent"] >= 25 and r.policy["interval"] == "10s"
    assert r.policy["baseEjectionTime"] == "30s"
    assert pick(report, "outlier", callee="catalog").policy is None


def test_the_consecutive_threshold_comes_from_the_measured_runs(report, store):
    """Longer than any run on a healthy instance; reached by the bad one; the runs match a direct count."""
    r = pick(report, "outlier", callee="inventory")
    k, figs = r.policy["consecutive5xxErrors"], r.evidence.figures
    assert 3 <= k <= 10 and k > figs["longest_healthy_run"]
    assert figs["runs_of_k_on_ejected"][gt.BAD_INSTANCE] > 0
    # 503s only: the gateway counter is recommended as well.
    assert r.policy["consecutiveGatewayErrors"] >= 3
    addr = gt.BAD_INSTANCE.split(":")[0]
    rows = store.query_rows(f"SELECT toUnixTimestamp64Nano(time), status >= 500 OR error != '' FROM calls WHERE "
                            f"observer = 'client' AND dst_addr = '{addr}' AND {gt.WINDOW.where()}")
    lengths, run = [], 0
    for _, failed in sorted(rows) + [(None, 0)]:
        if failed:
            run += 1
        elif run:
            lengths, run = lengths + [run], 0
    assert figs["instances"][gt.BAD_INSTANCE]["longest_run"] == max(lengths)
    [row] = [r for _, r in instance_frame(open_scope(store, gt.WINDOW, "inventory")).iterrows()
             if r["instance"] == gt.BAD_INSTANCE]
    assert row["failed"] == sum(lengths)
    assert list(row["runs_ge"]) == [sum(n >= k for n in lengths) for k in range(1, MAX_RUN + 1)]


def test_mtls_blockers_are_exactly_the_unmeshed_callers(report):
    recs = [r for r in report.recommendations if r.kind == "mtls" and r.policy]
    blockers = {b for r in recs for b in r.evidence.figures["blockers"]}
    assert blockers == gt.UNMESHED
    verdicts = {r.target["callee"]: r.policy["verdict"] for r in recs}
    assert verdicts["payments"] == "blocked by legacy-batch"
    assert verdicts["accounts"] == "blocked by cron, reports"
    assert verdicts["catalog"] == "STRICT-ready"
    assert verdicts["notifications"] == "PERMISSIVE first"


def test_mtls_refuses_thin_services_whatever_their_callers(report):
    """audit is called in plaintext by the unmeshed cron, but only THIN_MTLS_N times: no verdict."""
    for callee, n in (("audit", gt.THIN_MTLS_N), ("search", gt.THIN_N)):
        r = pick(report, "mtls", callee=callee)
        assert r.policy is None and r.evidence.confidence == "none"
        assert r.evidence.reason == f"not enough data (n={n}, need 100 inbound calls)"
    assert set(pick(report, "mtls", callee="audit").evidence.figures["callers"]) == {"cron"}


def test_service_filter_keeps_only_that_destination(store):
    rep = recommend(store, gt.WINDOW, "inventory")
    assert {r.target["callee"] for r in rep.recommendations} == {"inventory"}


def test_report_frame_and_json(report):
    df = report.frame()
    assert len(df) == len(report.recommendations)
    assert set(df["kind"]) == {"timeout", "retry", "outlier", "connection_pool", "mtls"}
    assert '"recommendations"' in report.as_json()


def test_an_empty_window_and_an_unknown_service_raise(store):
    from meshlens.analysis import NoData, UnknownService

    with pytest.raises(NoData, match="no calls in the window"):
        open_scope(store, Window(gt.T0.replace(year=2020), gt.T0.replace(year=2021)))
    with pytest.raises(UnknownService, match="'nope'"):
        open_scope(store, gt.WINDOW, "nope")

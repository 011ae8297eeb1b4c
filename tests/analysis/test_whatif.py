"""What-if figures equal a direct count over the same rows."""
from __future__ import annotations

import numpy as np
import pytest

from meshlens.analysis import open_scope
from meshlens.analysis.whatif import breaker_whatif, retry_whatif, timeout_curve, timeout_whatif
from tests.analysis import traffic as gt

CLIENT_CATALOG = f"observer = 'client' AND dst_service = 'catalog' AND {gt.WINDOW.where()}"


@pytest.fixture(scope="module")
def scope(store):
    return open_scope(store, gt.WINDOW)


def test_timeout_cuts_equal_a_direct_count(scope, store):
    df = timeout_whatif(scope, 0.05, callee="catalog")
    assert len(df) == 1
    cut, cut_ok = store.query_rows(
        f"SELECT countIf(duration_ns > 50000000), countIf(duration_ns > 50000000 AND error = '' AND status < 500) "
        f"FROM calls WHERE {CLIENT_CATALOG}")[0]
    row = df.iloc[0]
    assert (row["cut"], row["cut_ok"], row["n"]) == (cut, cut_ok, gt.CATALOG_N)
    assert row["cut_share_lo"] <= cut / gt.CATALOG_N <= row["cut_share_hi"]


def test_streams_would_all_be_cut_by_an_ordinary_timeout(scope):
    df = timeout_whatif(scope, 1.0, callee="notifications")
    assert df.iloc[0]["cut"] == df.iloc[0]["n"] == 300


def test_retry_figures_follow_a_direct_count_of_transient_failures(scope, store):
    df = retry_whatif(scope, attempts=2, callee="catalog").iloc[0]
    failures = store.query_rows(f"SELECT countIf(status IN (502, 503, 504)) FROM calls WHERE {CLIENT_CATALOG}")[0][0]
    assert df["transient_failures"] == failures
    p = df["p_success_on_retry"]
    assert df["recovered"] == pytest.approx(failures * (1 - (1 - p) ** 2))
    assert df["retries_sent"] == pytest.approx(failures * (1 + (1 - p)))
    assert df["recovered_lo"] <= df["recovered"] <= df["recovered_hi"] <= failures


def test_retry_probability_equals_a_direct_replay(scope, store):
    """P(success on retry): per failure, the success share of the other calls in its 10 s bucket."""
    rows = store.query_rows(f"SELECT intDiv(toUnixTimestamp64Nano(time), 10000000000), status >= 500 "
                            f"FROM calls WHERE {CLIENT_CATALOG}")
    b = np.array([r[0] for r in rows])
    f = np.array([bool(r[1]) for r in rows])
    num = den = 0.0
    for key in np.unique(b):
        m = b == key
        n, k = int(m.sum()), int(f[m].sum())
        if n > 1:
            num += k * (n - k) / (n - 1)
            den += k
    assert retry_whatif(scope, 1, callee="catalog").iloc[0]["p_success_on_retry"] == pytest.approx(num / den)


INVENTORY = f"observer = 'client' AND dst_service = 'inventory' AND {gt.WINDOW.where()}"


def replay(rows: list[tuple[int, int, int]], consecutive: int, base_ns: int) -> tuple[int, int, int]:
    """The consecutive-errors rule, call by call in Python: (trips, rejected, rejected failures).

    rows: (time ns, counted as an error, failed), in time order.
    """
    count, until, trips, rejected, rejected_failed = 0, -1, 0, 0, 0
    for t, err, failed in rows:
        if t < until:
            rejected += 1
            rejected_failed += failed
        elif not err:
            count = 0
        elif count + 1 >= consecutive:
            count, until, trips = 0, t + base_ns, trips + 1
        else:
            count += 1
    return trips, rejected, rejected_failed


def instance_rows(store, instance: str, err_sql: str) -> list[tuple[int, int, int]]:
    addr, port = instance.split(":")
    rows = store.query_rows(
        f"SELECT toUnixTimestamp64Nano(time), toUInt8({err_sql}), toUInt8(status >= 500 OR error != '') FROM calls "
        f"WHERE {INVENTORY} AND dst_addr = '{addr}' AND dst_port = {port}")
    return sorted((int(t), int(e), int(f)) for t, e, f in rows)


@pytest.mark.parametrize("consecutive, base_s", [(3, 30), (5, 10), (2, 60)])
def test_breaker_rejections_equal_a_direct_replay_over_the_rows(scope, store, consecutive, base_s):
    df = breaker_whatif(scope, consecutive=consecutive, base_ejection_s=base_s, callee="inventory")
    assert len(df) == 4
    for r in df.itertuples():
        rows = instance_rows(store, r.instance, "status >= 500 OR error != ''")
        trips, rejected, rejected_failed = replay(rows, consecutive, base_s * 10**9)
        assert (r.n, r.trips, r.rejected, r.rejected_failed) == (len(rows), trips, rejected, rejected_failed)


def test_the_breaker_trips_only_on_the_bad_instance(scope):
    df = breaker_whatif(scope, consecutive=3, callee="inventory")
    assert list(df[df["trips"] > 0]["instance"]) == [gt.BAD_INSTANCE]
    bad = df[df["instance"] == gt.BAD_INSTANCE].iloc[0]
    assert bad["rejected"] > 0 and 0 < bad["rejected_failed"] < bad["rejected"]


def test_the_gateway_counter_replays_gateway_errors(scope, store):
    df = breaker_whatif(scope, consecutive=3, callee="inventory", gateway=True)
    r = df[df["instance"] == gt.BAD_INSTANCE].iloc[0]
    rows = instance_rows(store, gt.BAD_INSTANCE, "status IN (502, 503, 504) OR error != ''")
    assert (r["trips"], r["rejected"]) == replay(rows, 3, 30 * 10**9)[:2]


def test_the_timeout_curve_equals_single_timeouts(scope):
    curve = timeout_curve(scope, [0.01, 0.05, 0.1], callee="catalog")
    assert list(curve["timeout_s"]) == [0.01, 0.05, 0.1]
    assert list(curve["cut"]) == sorted(curve["cut"], reverse=True)
    for r in curve.itertuples():
        one = timeout_whatif(scope, r.timeout_s, callee="catalog").iloc[0]
        assert (r.cut, r.cut_ok, r.n) == (one["cut"], one["cut_ok"], one["n"])

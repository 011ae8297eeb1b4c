"""What-if figures equal a direct count over the same rows."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import open_scope
from analysis.whatif import breaker_whatif, retry_whatif, timeout_whatif
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


def test_breaker_rejections_equal_a_direct_replay_and_hit_only_the_bad_instance(scope, store):
    df = breaker_whatif(scope, consecutive=3, interval_s=10, base_ejection_s=30, callee="inventory")
    tripped = df[df["trips"] > 0]
    assert list(tripped["instance"]) == [gt.BAD_INSTANCE]
    rows = store.query_rows(
        f"SELECT intDiv(toUnixTimestamp64Nano(time), 10000000000), status >= 500 OR error != '' FROM calls "
        f"WHERE observer = 'client' AND dst_service = 'inventory' AND dst_addr = '10.0.2.3' AND {gt.WINDOW.where()}")
    per: dict[int, list[int]] = {}
    for b, failed in rows:
        per.setdefault(b, [0, 0])
        per[b][0] += 1
        per[b][1] += int(failed)
    trips = [b for b, (n, f) in per.items() if f >= 3 and 2 * f >= n]
    rejected = sum(n for b, (n, _) in per.items() if any(t < b <= t + 3 for t in trips))
    row = tripped.iloc[0]
    assert (row["trips"], row["rejected"]) == (len(trips), rejected)
    assert rejected > 0

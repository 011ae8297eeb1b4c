"""The dry-run dashboard's numbers on our own traffic (tests/dashboards/traffic.py PHASES: payments observed, in
dry-run, enforced, rolled back to dry-run): each word counts each call once, on the row of the sidecar that
ran its policy, in the phases it was written in; the modes' figures are analysis'. (That every panel runs
and fits its panel type: test_execution.py.)"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from meshlens.dashboards import load_all
from meshlens.dashboards.dryrun import CALLEE_WORDS, EXAMPLES_PER_WORD
from tests.dashboards.runner import analysis_scope, panels, resolve_variables, run, time_range
from tests.dashboards.traffic import phase_windows, planned, planned_calls, planned_words

DASH = load_all()["meshlens-dryrun"]
MODES = ("observe", "dry-run", "enforce")


def panel(title: str) -> dict[str, Any]:
    return next(p for p in panels(DASH) if p["type"] != "row" and p["title"].startswith(title))


def rows(own_store, title: str, service: str = "payments") -> list[dict[str, Any]]:
    store = own_store.store
    tr = time_range(store)
    variables = resolve_variables(store, DASH, tr, {"service": service})
    return run(store, panel(title)["targets"][0]["rawSql"], variables, tr).to_pylist()


def calls_per_word(own_store, title: str, service: str = "payments") -> dict[str, int]:
    """A per-second series summed back to calls: rate x the interval Grafana would ask for."""
    seconds = max(time_range(own_store.store).interval_ms // 1000, 1)
    out: dict[str, float] = defaultdict(float)
    for r in rows(own_store, title, service):
        out[r["word"]] += r["calls_per_s"] * seconds
    return {w: round(n) for w, n in out.items()}


def in_phase(bucket: Any, mode: str, own_store) -> bool:
    """A time series point (its bucket's start, seconds: an int or a datetime, as Arrow gives DateTime) lies
    in a phase of `mode`, give or take the bucket, which starts up to an interval before its first call."""
    start_s = bucket if isinstance(bucket, int) else int(bucket.timestamp())
    seconds = max(time_range(own_store.store).interval_ms // 1000, 1)
    return any(lo - seconds * 10**9 <= start_s * 10**9 < hi for lo, hi in phase_windows(mode, own_store.now_ns))


def test_the_services_are_those_in_dry_run_or_enforce(own_store) -> None:
    store = own_store.store
    tr = time_range(store)
    assert resolve_variables(store, DASH, tr)["service"].options == ["db", "payments", "search"]


def test_each_would_word_counts_the_calls_it_was_written_on(own_store) -> None:
    """Two words on one call count for both; would_route:v2 and :v3 are would_route; would_deny and
    would_rate_limit are on the callee's rows, which the caller-first rule would not pick."""
    got = calls_per_word(own_store, "Would do")
    assert set(got) == planned_words("would_") == {"would_retry", "would_timeout", "would_route", "would_eject",
                                                   "would_deny", "would_rate_limit", "would_fault"}
    assert got == {w: planned(w) for w in got}
    assert (got["would_retry"], got["would_route"], got["would_deny"]) == (18, 17, 5)


def test_each_enforced_word_counts_the_calls_it_was_written_on(own_store) -> None:
    """retried twice on one call is one retried call."""
    got = calls_per_word(own_store, "Did")
    assert set(got) == planned_words("") - planned_words("would_")
    assert got == {w: planned(w) for w in got}
    assert (got["retried"], got["routed"], got["denied"]) == (9, 12, 4)


def test_the_words_are_where_their_mode_was(own_store) -> None:
    """Over time: every would_* point in a dry-run phase, every enforced one in the enforce phase."""
    for title, mode in (("Would do", "dry-run"), ("Did", "enforce")):
        points = rows(own_store, title)
        assert points and all(in_phase(r["time"], mode, own_store) for r in points), title


def test_the_share_is_of_the_calls_made_in_dry_run_counted_on_the_words_side(own_store) -> None:
    got = {r["word"]: r for r in rows(own_store, "Share of dry-run calls")}
    assert set(got) == planned_words("would_")
    for word, r in got.items():
        side = word in CALLEE_WORDS
        total = planned_calls("dry-run", callee_side=side)
        assert (r["calls"], r["dry_run_calls"], r["share"]) == (planned(word), total, round(planned(word) / total, 4))
    # three refused calls never reached payments: the callee saw fewer
    assert got["would_retry"]["dry_run_calls"] == got["would_deny"]["dry_run_calls"] + 3


def test_a_word_every_observer_holds_counts_once(own_store) -> None:
    """api -> db: both sidecars and the tap hold would_retry on each failed exchange (tests/dashboards/traffic.py)."""
    store = own_store.store
    tr = time_range(store)
    window = (f"time >= toDateTime({tr.from_ms // 1000}) AND time <= toDateTime({tr.to_ms // 1000}) "
              "AND dst_service = 'db' AND action = 'would_retry'")
    [(exchanges, copies)] = store.query_rows(f"SELECT countIf(observer = 'client'), count() FROM meshlens.calls "
                                             f"WHERE {window}")
    assert exchanges > 0 and copies == 3 * exchanges
    assert calls_per_word(own_store, "Would do", service="db") == {"would_retry": exchanges}


def test_calls_per_mode_are_what_analysis_compares(own_store) -> None:
    """The figures analysis.mode_figures gives a guard and a dry-run report: calls, failures, exact p50/p99."""
    from meshlens.analysis.mode_figures import by_mode

    figures = by_mode(analysis_scope(own_store.store, time_range(own_store.store)), "payments")
    got = rows(own_store, "Calls per mode")
    assert [r["mode"] for r in got] == list(MODES)
    for r in got:
        f = figures[r["mode"]]
        assert (r["calls"], r["failed"]) == (f.n, f.failed) == (planned_calls(r["mode"]), f.failed)
        assert r["error_ratio"] == round(f.error_rate, 4)
        assert r["p50_ms"] == pytest.approx(f.p50_s * 1000, abs=5e-4)
        assert r["p99_ms"] == pytest.approx(f.p99_s * 1000, abs=5e-4)
    assert {r["mode"]: r["failed"] for r in got} == {"observe": 3, "dry-run": 18, "enforce": 7}


@pytest.mark.parametrize("title", ["Failure ratio by mode", "p99 latency by mode"])
def test_each_modes_series_is_where_the_mode_was(own_store, title: str) -> None:
    points = rows(own_store, title)
    assert {r["mode"] for r in points} == set(MODES)
    assert all(in_phase(r["time"], r["mode"], own_store) for r in points)


def test_example_calls_are_the_latest_few_of_each_would_word(own_store) -> None:
    got = rows(own_store, "Example calls")
    by_word: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in got:
        by_word[r["word"]].append(r)
    assert set(by_word) == planned_words("would_")
    for word, examples in by_word.items():
        assert len(examples) == min(EXAMPLES_PER_WORD, planned(word)), word
        assert all(word in {w.split(":")[0] for w in r["action"].split(",")} for r in examples), word
        assert [r["time"] for r in examples] == sorted((r["time"] for r in examples), reverse=True)
        assert {r["observer"] for r in examples} == {"server" if word in CALLEE_WORDS else "client"}, word

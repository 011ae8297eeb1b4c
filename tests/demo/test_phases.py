"""How --duration is shared by the demo's phases, and the faults' run-length model, as plain functions."""
from __future__ import annotations

import random

import pytest

from meshlens.demo.phases import OBSERVE_MIN_S, plan
from meshlens.demo.shop import fail_chances


def test_the_default_three_minutes_are_observe_dry_run_enforce_mtls() -> None:
    assert [(p.name, p.seconds) for p in plan(180)] == [
        ("observe", 60), ("dry-run", 30), ("enforce", 60), ("mTLS", 30)]


@pytest.mark.parametrize("duration", [3, 30, 60, 90, 180, 600])
def test_phases_add_up_to_the_duration_and_observe_gets_its_minimum_when_there_is_room(duration: float) -> None:
    phases = plan(duration)
    assert [p.name for p in phases] == ["observe", "dry-run", "enforce", "mTLS"]
    assert sum(p.seconds for p in phases) == pytest.approx(duration)
    observe, dry_run, enforce, mtls = (p.seconds for p in phases)
    assert observe >= min(OBSERVE_MIN_S, duration * 0.75) and observe >= duration / 3
    assert enforce == pytest.approx(2 * dry_run) == pytest.approx(2 * mtls)
    assert [p.announcement().split(",")[0] for p in phases] == [
        "phase 1/4 observe", "phase 2/4 dry-run", "phase 3/4 enforce", "phase 4/4 mTLS"]


@pytest.mark.parametrize("share, run", [(0.15, 2.5), (0.3, 4.0), (0.05, None)])
def test_failures_come_in_the_share_and_runs_asked_for(share: float, run: float | None) -> None:
    again, start = fail_chances(share, run)
    rng, failing, failed, runs = random.Random(7), False, 0, 0
    n = 200_000
    for _ in range(n):
        was = failing
        failing = rng.random() < (again if failing else start)
        failed += failing
        runs += failing and not was
    assert failed / n == pytest.approx(share, rel=0.05)
    expected_run = run if run is not None else 1 / (1 - share)  # independent failures: geometric runs
    assert failed / runs == pytest.approx(expected_run, rel=0.05)

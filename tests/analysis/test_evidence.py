"""Small statistics and parsing, as transcripts."""
from __future__ import annotations

from datetime import timedelta

import pytest

from meshlens.analysis.evidence import duration_text, quantile_confidence, round_up_ms, wilson
from meshlens.analysis.retries import attempts_for
from meshlens.analysis.window import Window, parse_duration


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 10)[0] == 0.0


@pytest.mark.parametrize("s, rounded, text", [(0.1234, 0.13, "130ms"), (0.0871, 0.088, "88ms"),
                                              (2.01, 2.1, "2.1s"), (3.0, 3.0, "3s")])
def test_rounding_and_istio_durations(s, rounded, text):
    assert round_up_ms(s) == pytest.approx(rounded)
    assert duration_text(round_up_ms(s)) == text


def test_quantile_confidence_counts_samples_beyond_the_quantile():
    assert [quantile_confidence(n, 0.999) for n in (500, 5000, 20000, 200000)] == ["none", "low", "medium", "high"]


def test_attempts_grow_as_retries_succeed_less():
    assert [attempts_for(p) for p in (0.995, 0.95, 0.8, 0.6)] == [1, 2, 3, 3]


def test_durations_and_windows():
    assert parse_duration("1h30m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("1 hour")
    assert Window().where() == "1"
    assert "time >= toDateTime64(" in Window.last(timedelta(hours=1)).where()

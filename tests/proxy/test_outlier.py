"""Outlier detection on a clock the test holds: Envoy's consecutive-error ejections, their growing time, the
percentage cap that still ejects one, and panic below minHealthPercent."""
from __future__ import annotations

from meshlens.proxy.cluster import Endpoint
from meshlens.proxy.outlier import Outlier, OutlierConfig

EXAMPLE = {"consecutiveErrors": 5, "interval": "30s", "baseEjectionTime": "30s"}


def endpoints(n: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint("10.0.0.%d" % (i + 1), 8080, "") for i in range(n))


def test_the_example_five_gateway_errors_eject_for_30_s_then_60_s_the_next_time() -> None:
    cfg = OutlierConfig.from_spec(EXAMPLE)
    assert (cfg.consecutive_gateway, cfg.consecutive_5xx, cfg.interval, cfg.base_ejection) == (5, 0, 30.0, 30.0)
    eps = endpoints(2)
    bad = eps[0]
    od = Outlier(cfg)
    assert [od.result(eps, bad, 503, t) for t in (0, 1, 2, 3)] == [False] * 4
    assert od.result(eps, bad, 502, 4) is True and bad.ejected
    assert od.available(eps, 5) == (eps[1],)
    assert od.available(eps, 33) == (eps[1],)  # 30 s are up at 34; the interval's check (every 30 s) comes at 60
    assert od.available(eps, 60) == eps and not bad.ejected  # back, at the first check after its time
    for t in range(61, 65):
        od.result(eps, bad, 504, t)
    assert od.result(eps, bad, 503, 65) is True  # ejected a second time: 60 s now
    assert bad.ejected_until == 65 + 60
    assert od.available(eps, 120) == (eps[1],) and od.available(eps, 150) == eps


def test_other_5xx_reset_the_gateway_count_and_any_success_resets_both() -> None:
    od = Outlier(OutlierConfig(consecutive_5xx=0, consecutive_gateway=3))
    eps = endpoints(2)
    for status in (503, 503, 500, 503, 503, 200, 503, 503):
        assert od.result(eps, eps[0], status, 1) is False
    assert od.result(eps, eps[0], 503, 1) is True


def test_consecutive_5xx_counts_every_5xx() -> None:
    od = Outlier(OutlierConfig(consecutive_5xx=2))
    eps = endpoints(3)
    assert od.result(eps, eps[0], 500, 0) is False and od.result(eps, eps[0], 501, 0) is True


def test_the_percentage_caps_ejections_but_one_host_is_always_ejectable() -> None:
    od = Outlier(OutlierConfig(consecutive_5xx=1, max_ejection_percent=10))  # 10 % of 3 allows none: one anyway
    eps = endpoints(3)
    assert od.result(eps, eps[0], 500, 0) is True
    assert od.result(eps, eps[1], 500, 0) is False and not eps[1].ejected
    od = Outlier(OutlierConfig(consecutive_5xx=1, max_ejection_percent=100))
    eps = endpoints(2)
    assert od.result(eps, eps[0], 500, 0) and od.result(eps, eps[1], 500, 0)
    assert od.available(eps, 1) == ()  # none left: the router answers 503 UH


def test_below_min_health_percent_every_endpoint_takes_traffic() -> None:
    od = Outlier(OutlierConfig(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=60))
    eps = endpoints(2)
    od.result(eps, eps[0], 500, 0)
    assert od.available(eps, 1) == eps  # 50 % healthy < 60 %: panic


def test_an_ejected_endpoints_results_do_not_count_and_a_healthy_one_loses_its_multiplier() -> None:
    od = Outlier(OutlierConfig(consecutive_5xx=1, interval=10, base_ejection=10, max_ejection_percent=100))
    eps = endpoints(2)
    assert od.result(eps, eps[0], 500, 0)
    assert od.result(eps, eps[0], 500, 1) is False  # dry-run sends it traffic; enforced it would have had none
    od.check(eps, 10)  # back
    od.check(eps, 20)  # healthy for an interval: its multiplier falls back to 0
    assert not eps[0].ejected and eps[0].ejections == 0
    assert od.result(eps, eps[0], 500, 21) and eps[0].ejected_until == 31

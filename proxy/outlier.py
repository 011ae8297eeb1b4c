"""Outlier detection: endpoints that keep failing are ejected from balancing for a while, as Envoy does it.

A DestinationRule's `trafficPolicy.outlierDetection`, per destination service, with its
state on the cluster's endpoints (proxy/cluster.py), which a new snapshot keeps. No I/O:
time is passed in. Envoy's algorithm (intro/arch_overview/upstream/outlier):

- Each attempt's result counts for its endpoint. A 5xx response, or a failure with no
  response (connect failure, reset, timeout: local-origin errors mapped to 503 as Envoy
  does without `split_external_local_origin_errors`), adds to `consecutive5xxErrors`;
  502, 503, 504 and those failures add to `consecutiveGatewayErrors`, another 5xx resets
  that one; any other status resets both. A counter reaching its threshold ejects the
  endpoint at once (consecutive ejections run inline, not at the interval).
- An ejection is allowed when no endpoint is ejected, else while the ejected share stays
  within `maxEjectionPercent` (so one endpoint is always ejectable, whatever the
  percentage: Envoy ejects the first outlier "immediately").
- It lasts `baseEjectionTime` x the number of times the endpoint was ejected, at most
  `max(baseEjectionTime, 300 s)` (Envoy's max_ejection_time). Every `interval` ejected
  endpoints whose time is up come back, and an endpoint found healthy at that check has
  its multiplier decreased by one.
- Below `minHealthPercent` healthy endpoints, the cluster balances over all of them (Envoy's
  panic mode; Istio's default 0 never panics); with none healthy, 503 `UH`.

In dry-run the same state runs, but balancing ignores it: ejections are recorded as
`would_eject` and the ejected endpoint keeps its traffic, whose results do not count
(enforced, it would have had none), so that what dry-run ejects is what enforce ejects.
Defaults are Istio's (networking/v1alpha3/destination_rule.proto, OutlierDetection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlens.proxy.cluster import Endpoint

__all__ = ["MAX_EJECTION_TIME", "Outlier", "OutlierConfig"]

MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time default
_GATEWAY = (502, 503, 504)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_5xx: int = 5
    """0 turns it off."""
    consecutive_gateway: int = 0
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0

    @classmethod
    def from_spec(cls, spec: dict) -> OutlierConfig:
        """`outlierDetection`, checked by meshlens.policy.networking. `consecutiveErrors` (deprecated) is read
        as consecutiveGatewayErrors, with consecutive 5xx off, as Istio translated it when it still read it."""
        from meshlens.policy.spec import duration_s

        gateway = spec.get("consecutiveGatewayErrors", spec.get("consecutiveErrors", 0))
        five = spec.get("consecutive5xxErrors", 0 if "consecutiveErrors" in spec else 5)
        return cls(int(five), int(gateway),
                   duration_s(spec["interval"]) if "interval" in spec else 10.0,
                   duration_s(spec["baseEjectionTime"]) if "baseEjectionTime" in spec else 30.0,
                   int(spec.get("maxEjectionPercent", 10)), int(spec.get("minHealthPercent", 0)))


class Outlier:
    """The outlier state of one destination's endpoints."""

    __slots__ = ("config", "next_check", "ejected")

    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.next_check = 0.0
        self.ejected = 0
        """Endpoints ejected now."""

    def __repr__(self) -> str:
        return f"<Outlier {self.config}>"

    def result(self, endpoints: tuple[Endpoint, ...], ep: Endpoint, status: int, now: float) -> bool:
        """One attempt at `ep` ended with `status` (503 for a failure with no response): True when it ejected `ep`."""
        self.check(endpoints, now)
        if ep.ejected:
            return False  # enforced it had no traffic; in dry-run its results do not count
        cfg = self.config
        if status >= 500:
            ep.consecutive_5xx += 1
            ep.consecutive_gateway = ep.consecutive_gateway + 1 if status in _GATEWAY else 0
        else:
            ep.consecutive_5xx = ep.consecutive_gateway = 0
            return False
        tripped = ((cfg.consecutive_5xx and ep.consecutive_5xx >= cfg.consecutive_5xx)
                   or (cfg.consecutive_gateway and ep.consecutive_gateway >= cfg.consecutive_gateway))
        if not tripped or not self._may_eject(endpoints):
            return False
        ep.ejections += 1
        ep.ejected = True
        self.ejected += 1
        ep.ejected_until = now + min(cfg.base_ejection * ep.ejections, max(cfg.base_ejection, MAX_EJECTION_TIME))
        ep.consecutive_5xx = ep.consecutive_gateway = 0
        return True

    def _may_eject(self, endpoints: tuple[Endpoint, ...]) -> bool:
        ejected = sum(1 for e in endpoints if e.ejected)
        return ejected == 0 or (ejected + 1) * 100 <= self.config.max_ejection_percent * len(endpoints)

    def check(self, endpoints: tuple[Endpoint, ...], now: float) -> None:
        """Envoy's interval timer, run when due: ejections whose time is up end; healthy endpoints' multipliers fall."""
        nxt = self.next_check
        if now < nxt:
            return
        interval = self.config.interval
        # on Envoy's timer's beat (every interval from the first result), however long since the last check
        self.next_check = now + interval if nxt == 0.0 else nxt + interval * (int((now - nxt) / interval) + 1)
        for ep in endpoints:
            if ep.ejected:
                if now >= ep.ejected_until:
                    ep.ejected = False
                    self.ejected -= 1
            elif ep.ejections:
                ep.ejections -= 1

    def available(self, endpoints: tuple[Endpoint, ...], now: float,
                  every: tuple[Endpoint, ...] | None = None) -> tuple[Endpoint, ...]:
        """What to balance over among `endpoints` (a subset of `every`, the destination's), enforced: those not
        ejected, or all of them in panic."""
        if now >= self.next_check:
            self.check(every or endpoints, now)
        if not self.ejected:
            return endpoints
        healthy = tuple(e for e in endpoints if not e.ejected)
        if len(healthy) == len(endpoints):
            return endpoints
        if endpoints and len(healthy) * 100 < self.config.min_health_percent * len(endpoints):
            return endpoints  # panic: below minHealthPercent, every endpoint takes traffic
        return healthy

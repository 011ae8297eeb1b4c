"""One cluster per destination service: its endpoints and how the next one is picked.

Load balancing is Envoy's, chosen per service in mesh.yaml (`load_balancer`, named as
Istio's DestinationRule `trafficPolicy.loadBalancer.simple`):

- `ROUND_ROBIN` (the default): each endpoint in turn, in the mesh file's order.
- `LEAST_REQUEST`: Envoy's with all weights equal: `LEAST_REQUEST_CHOICES` endpoints drawn
  at random (with replacement), the one with the fewest active requests taken; on a tie
  the first drawn. Active requests are this sidecar's own: an exchange routed to an
  endpoint counts from `started` to `finished`, as Envoy's per-host `rq_active`.

No I/O: the random source is passed in (seeded in tests). Outlier detection
(proxy/outlier.py) keeps its state on the endpoints, which a new snapshot keeps; a
DestinationRule's subsets are the endpoints whose labels they name (`subset`).
"""
from __future__ import annotations

import random
from collections.abc import Callable

from meshlens.mesh import LoadBalancer, Service

__all__ = ["LEAST_REQUEST_CHOICES", "Cluster", "Endpoint"]

# Envoy's least_request choice_count default: two random choices ("power of two choices"),
# close to a full scan's balance without sending every pick to the one least-loaded endpoint.
LEAST_REQUEST_CHOICES = 2


class Endpoint:
    """One instance of the service, as the cluster balances over it."""

    __slots__ = ("host", "port", "subset", "labels", "active", "consecutive_5xx", "consecutive_gateway", "ejected",
                 "ejected_until", "ejections")

    def __init__(self, host: str, port: int, subset: str, labels: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.subset = subset
        """The first subset (mesh.yaml order) whose labels the instance carries, else ''."""
        self.labels = labels or {}
        self.active = 0
        """Exchanges routed here that have not finished yet."""
        # outlier detection's state (proxy/outlier.py)
        self.consecutive_5xx = self.consecutive_gateway = 0
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0
        """Times ejected, less one for each interval found healthy: the ejection time's multiplier."""

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    def __repr__(self) -> str:
        return f"<Endpoint {self.host}:{self.port} subset={self.subset!r} active={self.active}>"


class Cluster:
    """The endpoints of one service and its load balancer (per process)."""

    __slots__ = ("name", "endpoints", "load_balancer", "pick", "subsets", "_next", "_random")

    def __init__(self, service: Service, rng: random.Random | None = None) -> None:
        self.name = service.name
        self.endpoints: tuple[Endpoint, ...] = tuple(
            Endpoint(i.host, i.port, service.subset_of(i), i.labels) for i in service.instances)
        self.subsets: dict[str, tuple[Endpoint, ...]] = {}
        self.load_balancer: LoadBalancer = service.load_balancer
        self._next = 0
        self._random: Callable[[], float] = (rng or random.Random()).random
        self.pick: Callable[[], Endpoint | None] = (
            self._least_request if service.load_balancer == "LEAST_REQUEST" else self._round_robin)
        """The endpoint the next exchange goes to; None when the service has none."""

    def __repr__(self) -> str:
        return f"<Cluster {self.name} {self.load_balancer} endpoints={len(self.endpoints)}>"

    def started(self, endpoint: Endpoint) -> None:
        """An exchange was routed to `endpoint`."""
        endpoint.active += 1

    def finished(self, endpoint: Endpoint) -> None:
        """An exchange `started` on `endpoint` ended, however it ended."""
        if endpoint.active > 0:
            endpoint.active -= 1

    def subset(self, name: str, labels: dict[str, str]) -> tuple[Endpoint, ...]:
        """The endpoints a DestinationRule subset selects (every label it names, with its value)."""
        eps = self.subsets.get(name)
        if eps is None:
            eps = self.subsets[name] = tuple(
                e for e in self.endpoints if all(e.labels.get(k) == v for k, v in labels.items()))
        return eps

    def choose(self, eps: tuple[Endpoint, ...]) -> Endpoint | None:
        """`pick`, among `eps` (a subset, the endpoints not ejected, those not tried yet)."""
        if self.load_balancer == "LEAST_REQUEST":
            return self._least_request(eps)
        if not eps:
            return None
        i = self._next
        self._next = i + 1
        return eps[i % len(eps)]

    def _round_robin(self) -> Endpoint | None:
        eps = self.endpoints
        if not eps:
            return None
        i = self._next
        self._next = i + 1
        return eps[i % len(eps)]

    def _least_request(self, eps: tuple[Endpoint, ...] | None = None) -> Endpoint | None:
        if eps is None:
            eps = self.endpoints
        n = len(eps)
        if n <= 1:
            return eps[0] if eps else None
        rnd = self._random
        best = eps[int(rnd() * n)]
        for _ in range(LEAST_REQUEST_CHOICES - 1):
            drawn = eps[int(rnd() * n)]
            if drawn.active < best.active:
                best = drawn
        return best

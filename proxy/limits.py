"""Limits on how much is sent: a destination's connection pool (circuit breaking) and a service's rate limit.

No I/O; time is passed in.

`Breaker` is a DestinationRule's `trafficPolicy.connectionPool` for one destination, as
Envoy's circuit breakers carry it out (intro/arch_overview/upstream/circuit_breaking),
counted by this sidecar alone, as each Envoy counts its own:

- HTTP/1.1 carries one request a connection, so `tcp.maxConnections` bounds the requests
  sent at once; one more waits in the pending queue, up to `http.http1MaxPendingRequests`,
  and beyond that is refused at once: 503 with the `UO` flag (overflow). `http2MaxRequests`
  bounds the requests sent at once whatever the protocol. An HTTP/2 upstream carries many
  requests a connection, so for one only `http2MaxRequests` bounds them (Envoy's
  max_connections counts its connections, not streams). A waiting request goes as soon
  as one sent ends.
- `http.maxRetries`: retries in progress at once; one more is not made.
- Defaults are Istio's: every limit 2^32-1 (unlimited) unless given.

In dry-run the same counts run over the same exchanges, with waiting only pretended (the
exchange goes at once; it is counted as pending until the one it would have waited for
ends), so what dry-run would have refused is what enforce refuses.

`TokenBucket` is meshlens' `LocalRateLimit` on a service's inbound side: Envoy's local
rate limit token bucket (http_filters/local_rate_limit_filter): it starts full with
`maxTokens`; every `fillInterval` adds `tokensPerFill`, up to `maxTokens`; a request
takes one token, and with none left it is answered 429 `local_rate_limited`, flag `RL`,
with the x-ratelimit-limit/remaining/reset headers of Envoy's enable_x_ratelimit_headers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlens.proxy.exchange import Exchange

__all__ = ["UNLIMITED", "Breaker", "PoolLimits", "TokenBucket"]

UNLIMITED = 2**32 - 1
# How an exchange is counted by its destination's breaker (Exchange.slot).
SENT, PENDING = 1, 2


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int = 0
    """0: unlimited."""
    connect_timeout: float | None = None
    idle_timeout: float | None = None

    @classmethod
    def from_spec(cls, spec: dict) -> PoolLimits:
        """`connectionPool`, checked by meshlens.policy.networking."""
        from meshlens.policy.spec import duration_s

        tcp, http = spec.get("tcp") or {}, spec.get("http") or {}
        return cls(int(tcp.get("maxConnections", UNLIMITED)), int(http.get("http1MaxPendingRequests", UNLIMITED)),
                   int(http.get("http2MaxRequests", UNLIMITED)), int(http.get("maxRetries", UNLIMITED)),
                   int(http.get("maxRequestsPerConnection", 0)),
                   duration_s(tcp["connectTimeout"]) if "connectTimeout" in tcp else None,
                   duration_s(http["idleTimeout"]) if "idleTimeout" in http else None)


class Breaker:
    """One destination's counts: requests sent, requests pending, retries in progress."""

    __slots__ = ("limits", "sent", "pending", "retries")

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.sent = 0
        self.pending: deque[Exchange] = deque()
        self.retries = 0

    def __repr__(self) -> str:
        return f"<Breaker sent={self.sent} pending={len(self.pending)} retries={self.retries}>"

    def admit(self, ex: Exchange) -> str:
        """'sent' (go now), 'pending' (wait for `ended` to let it go), or 'overflow' (refuse it)."""
        lim = self.limits
        if (self.sent < lim.max_connections or ex.upstream_h2) and self.sent < lim.max_requests:
            self.sent += 1
            ex.slot = SENT
            return "sent"
        if len(self.pending) < lim.max_pending:
            self.pending.append(ex)
            ex.slot = PENDING
            return "pending"
        return "overflow"

    def ended(self, ex: Exchange) -> Exchange | None:
        """`ex` is over (however it ended): its place is given up; returns the pending exchange that goes now."""
        slot, ex.slot = ex.slot, 0
        if ex.retrying:
            ex.retrying = False
            self.retries -= 1
        if slot == PENDING:
            try:
                self.pending.remove(ex)
            except ValueError:
                pass
            return None
        if slot != SENT:
            return None
        self.sent -= 1
        while self.pending:
            nxt = self.pending.popleft()
            if nxt.slot == PENDING:
                nxt.slot = SENT
                self.sent += 1
                return nxt
        return None

    def retry(self, ex: Exchange) -> bool:
        """May `ex` retry now (maxRetries retries in progress at most)? Counts it until it ends."""
        if ex.retrying:
            return True
        if self.retries >= self.limits.max_retries:
            return False
        self.retries += 1
        ex.retrying = True
        return True


class TokenBucket:
    """Envoy's local rate limit bucket (one per service, per sidecar)."""

    __slots__ = ("max_tokens", "per_fill", "interval", "tokens", "filled_at")

    def __init__(self, max_tokens: int, per_fill: int, interval: float) -> None:
        self.max_tokens, self.per_fill, self.interval = max_tokens, per_fill, interval
        self.tokens = max_tokens
        self.filled_at: float | None = None
        """When it was last filled; full until its first request."""

    @classmethod
    def from_spec(cls, spec: dict) -> TokenBucket:
        from meshlens.policy.spec import duration_s

        b = spec["tokenBucket"]
        return cls(int(b["maxTokens"]), int(b.get("tokensPerFill", 1)), duration_s(b["fillInterval"]))

    def take(self, now: float) -> bool:
        """One token, if there is one."""
        if self.filled_at is None:
            self.filled_at = now
        fills = int((now - self.filled_at) / self.interval)
        if fills:
            self.tokens = min(self.max_tokens, self.tokens + fills * self.per_fill)
            self.filled_at += fills * self.interval
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True

    def headers(self, now: float) -> bytes:
        """Envoy's x-ratelimit headers (draft 03) for a response."""
        reset = max(0.0, (self.filled_at or now) + self.interval - now)
        return (b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: %d\r\nx-ratelimit-reset: %d\r\n"
                % (self.max_tokens, max(self.tokens, 0), int(reset + 0.999)))

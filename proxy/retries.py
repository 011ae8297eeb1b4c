"""When a failed attempt is tried again, and after how long: Istio's HTTPRetry as Envoy carries it out.

No I/O: `RetryPolicy` answers whether a response status or a local failure is retriable
under its `retryOn`, and how long to back off before retry number n. The exchange owns
the attempts and the replay buffer (a request whose body outgrew it is never retried);
proxy/policies.py's `Retry` puts this policy into the chain.

Istio's semantics, with their sources:

- No `retries` on a route: Istio's default policy, 2 retries on `connect-failure,
  refused-stream,unavailable,cancelled,retriable-status-codes` with no status code listed,
  so a 503 answered by the upstream is not retried (istio/pilot/pkg/networking/core/route/
  retry/retry.go, DefaultPolicy). `attempts: 0` turns retrying off.
- `retryOn` words are Envoy's x-envoy-retry-on (configuration/http/http_filters/
  router_filter): `5xx` any 5xx or no response (reset, connect failure, timeout);
  `gateway-error` 502, 503, 504 or no response; `reset` no response at all;
  `connect-failure`; `retriable-4xx` (409); `refused-stream` (HTTP/2, never on HTTP/1.1);
  `retriable-status-codes` the codes listed; a bare number is a status code to retry (Istio).
  gRPC's words (cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)
  match the grpc-status of a response that carries it in its head (trailers-only), as
  Envoy's x-envoy-retry-grpc-on: a status in the trailers comes after the response went
  to the client, too late to retry. HTTP/1.1 calls carry none.
- Backoff: Envoy's fully jittered exponential backoff, base 25 ms (`retries.backoff`
  overrides it), retry n waits a random time in [0, (2^n - 1) x base], capped at 10 x base
  (250 ms) (arch_overview/http/http_routing, "Retry semantics").
- A retry goes to a host not tried yet when there is one (Istio sets Envoy's
  previous_hosts predicate: `retryIgnorePreviousHosts` defaults to true).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meshlens.proxy.connect import UF, LocalReply

__all__ = ["BACKOFF_BASE", "DEFAULT_RETRY", "RetryPolicy", "no_response"]

BACKOFF_BASE = 0.025
# Envoy's gRPC retry-on words and the status each retries.
GRPC_RETRY_ON = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}
_GATEWAY = frozenset({502, 503, 504})
# The record's error classes of a failure with no response from the upstream (proxy/connect.py, exchange.py).
_NO_RESPONSE = frozenset({"refused", "unreachable", "reset", "timeout", "protocol_error"})


def no_response(reply: LocalReply) -> bool:
    """A local failure in which the upstream never answered (what Envoy calls a reset or connect failure)."""
    return reply.error in _NO_RESPONSE


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """One route's retries."""

    attempts: int
    """Retries after the first try (Istio's `attempts`); 0: none."""
    on: frozenset[str]
    codes: frozenset[int] = frozenset()
    """Status codes retried (retriable-status-codes and bare numbers in retryOn)."""
    per_try_timeout: float | None = None
    backoff_base: float = BACKOFF_BASE

    lowest: int = field(init=False, default=1000, compare=False)
    """The lowest status it may retry (1000 when none): a status below is answered without a look."""
    grpc_codes: frozenset[int] = field(init=False, default=frozenset(), compare=False)
    """The gRPC status codes it retries (from its gRPC words)."""

    def __post_init__(self) -> None:
        low = [*self.codes, 500 if "5xx" in self.on else 1000, 502 if "gateway-error" in self.on else 1000,
               409 if "retriable-4xx" in self.on else 1000]
        object.__setattr__(self, "lowest", min(low))
        object.__setattr__(self, "grpc_codes", frozenset(GRPC_RETRY_ON[w] for w in self.on if w in GRPC_RETRY_ON))

    @classmethod
    def from_spec(cls, spec: dict | None) -> RetryPolicy:
        """A VirtualService route's `retries` (None: Istio's default policy). The spec was checked by
        meshlens.policy.networking, which refuses a `retryOn` word Envoy does not know."""
        if spec is None:
            return DEFAULT_RETRY
        words = [w.strip() for w in str(spec.get("retryOn", "")).split(",") if w.strip()]
        codes = frozenset(int(w) for w in words if w.isdigit())
        on = frozenset(w for w in words if not w.isdigit())
        if not words:  # Istio: retryOn left out means its default conditions
            on, codes = DEFAULT_RETRY.on, DEFAULT_RETRY.codes
        if codes:
            on |= {"retriable-status-codes"}
        from meshlens.policy.spec import duration_s

        per_try = duration_s(spec["perTryTimeout"]) if spec.get("perTryTimeout") else None
        base = duration_s(spec["backoff"]) if spec.get("backoff") else BACKOFF_BASE
        return cls(int(spec.get("attempts", DEFAULT_RETRY.attempts)), on, codes, per_try, base)

    def retriable_status(self, status: int) -> bool:
        on = self.on
        if status >= 500 and "5xx" in on:
            return True
        if status in _GATEWAY and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        return status in self.codes and "retriable-status-codes" in on

    def retriable_failure(self, reply: LocalReply) -> bool:
        """A failure before any response (connect failure, reset, per-try timeout, malformed response)."""
        on = self.on
        if reply.error == "refused_stream":  # HTTP/2: the server refused the stream, or a GOAWAY left it unread
            return bool(on & {"refused-stream", "reset", "5xx", "gateway-error"})
        if reply.flags == UF:  # refused, unreachable, or the connect timed out
            return bool(on & {"connect-failure", "5xx", "gateway-error", "reset"})
        if reply.error in _NO_RESPONSE:
            return bool(on & {"5xx", "gateway-error", "reset"})
        return self.retriable_status(reply.status) and reply.error not in ("overflow", "no_healthy_upstream")

    def backoff(self, retry: int, random: Callable[[], float]) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        ceiling = min(((1 << min(retry, 16)) - 1) * self.backoff_base, 10 * self.backoff_base)
        return random() * ceiling


DEFAULT_RETRY = RetryPolicy(2, frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                                          "retriable-status-codes"}))

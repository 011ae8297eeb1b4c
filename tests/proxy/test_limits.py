"""The connection pool's limits (Envoy's circuit breakers) and the local rate limit's token bucket."""
from __future__ import annotations

from meshlens.proxy.limits import PENDING, SENT, Breaker, PoolLimits, TokenBucket


class Ex:
    slot = 0
    retrying = False
    upstream_h2 = False


class H2Ex(Ex):
    upstream_h2 = True


def test_http2_requests_are_bounded_by_http2_max_requests_not_connections() -> None:
    b = Breaker(PoolLimits.from_spec({"tcp": {"maxConnections": 1}, "http": {"http2MaxRequests": 3,
                                                                              "http1MaxPendingRequests": 1}}))
    assert [b.admit(H2Ex()) for _ in range(5)] == ["sent", "sent", "sent", "pending", "overflow"]


def test_beyond_max_connections_requests_wait_and_beyond_the_pending_queue_they_overflow() -> None:
    b = Breaker(PoolLimits.from_spec({"tcp": {"maxConnections": 2}, "http": {"http1MaxPendingRequests": 1}}))
    xs = [Ex() for _ in range(4)]
    assert [b.admit(x) for x in xs] == ["sent", "sent", "pending", "overflow"]
    assert b.ended(xs[0]) is xs[2] and xs[2].slot == SENT  # the pending one goes when one sent ends
    assert b.admit(Ex()) == "pending"


def test_a_pending_request_that_ends_gives_up_its_place() -> None:
    b = Breaker(PoolLimits(max_connections=1, max_pending=1))
    a, p = Ex(), Ex()
    b.admit(a), b.admit(p)
    assert p.slot == PENDING and b.ended(p) is None and b.ended(a) is None and b.sent == 0


def test_http2_max_requests_bounds_requests_sent_and_max_retries_retries_in_progress() -> None:
    b = Breaker(PoolLimits(max_requests=1, max_pending=0, max_retries=1))
    a = Ex()
    assert b.admit(a) == "sent" and b.admit(Ex()) == "overflow"
    assert b.retry(a) and b.retry(a)  # the same exchange's next retry is still one in progress
    assert not b.retry(Ex())
    b.ended(a)
    assert b.retries == 0 and b.retry(Ex())


def test_pool_settings_are_read_with_istios_defaults() -> None:
    lim = PoolLimits.from_spec({"tcp": {"maxConnections": 100, "connectTimeout": "250ms"},
                                "http": {"http1MaxPendingRequests": 50, "maxRequestsPerConnection": 2}})
    assert (lim.max_connections, lim.max_pending, lim.max_requests_per_connection, lim.connect_timeout) == (
        100, 50, 2, 0.25)
    assert PoolLimits().max_connections == 2**32 - 1


def test_the_token_bucket_starts_full_and_fills_by_interval() -> None:
    bucket = TokenBucket.from_spec({"tokenBucket": {"maxTokens": 2, "tokensPerFill": 1, "fillInterval": "1s"}})
    assert [bucket.take(100.0), bucket.take(100.1), bucket.take(100.2)] == [True, True, False]
    assert b"x-ratelimit-remaining: 0\r\n" in bucket.headers(100.2)
    assert bucket.take(101.0) and not bucket.take(101.5)  # one token a second
    assert [bucket.take(110.0), bucket.take(110.0), bucket.take(110.0)] == [True, True, False]  # never above max


class Idle:
    """An idle upstream connection as the pool sees it."""

    def __init__(self, addr: tuple[str, int], idle_for: float, idle_timeout: float | None) -> None:
        import time

        self.addr, self.closed, self.idle_timeout = addr, False, idle_timeout
        self.idle_since = time.monotonic() - idle_for

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_destinations_idle_timeout_closes_its_idle_connections_sooner_than_the_pools() -> None:
    from meshlens.proxy.pool import POOL_IDLE_TIMEOUT, Pool

    pool = Pool({"upstream_cx_reused": 0})
    short, default = Idle(("10.0.0.1", 80), 2.0, 1.0), Idle(("10.0.0.2", 80), 2.0, None)
    for up in (short, default):
        pool.idle.setdefault(up.addr, __import__("collections").deque()).append(up)
    assert pool.take(short.addr) is None and short.closed  # idle 2 s, its destination's idleTimeout 1 s
    assert pool.take(default.addr) is default and 2.0 < POOL_IDLE_TIMEOUT

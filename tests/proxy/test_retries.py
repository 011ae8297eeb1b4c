"""Retry conditions and backoff as Istio and Envoy define them."""
from __future__ import annotations

import random

import pytest

from meshlens.proxy.connect import UPSTREAM_PROTOCOL_ERROR, UPSTREAM_RESET, LocalReply, failure
from meshlens.proxy.retries import DEFAULT_RETRY, RetryPolicy

REFUSED = failure(ConnectionRefusedError())
CONNECT_TIMEOUT = failure(TimeoutError())
PER_TRY = LocalReply(504, "upstream request timeout (per try)", "timeout", "UT")


def test_istios_default_policy_retries_connect_failures_twice_and_never_a_503() -> None:
    assert DEFAULT_RETRY.attempts == 2
    assert DEFAULT_RETRY.retriable_failure(REFUSED) and DEFAULT_RETRY.retriable_failure(CONNECT_TIMEOUT)
    assert not DEFAULT_RETRY.retriable_status(503) and not DEFAULT_RETRY.retriable_failure(UPSTREAM_RESET)
    assert RetryPolicy.from_spec(None) is DEFAULT_RETRY


@pytest.mark.parametrize("retry_on, status, expected", [
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 404, False), ("gateway-error", 502, True),
    ("gateway-error", 500, False), ("retriable-4xx", 409, True), ("retriable-4xx", 404, False),
    ("503", 503, True), ("503", 502, False), ("connect-failure", 503, False), ("reset", 503, False),
    ("retriable-status-codes,429", 429, True),
])
def test_retry_on_statuses(retry_on: str, status: int, expected: bool) -> None:
    assert RetryPolicy.from_spec({"attempts": 3, "retryOn": retry_on}).retriable_status(status) is expected


@pytest.mark.parametrize("retry_on, reply, expected", [
    ("connect-failure", REFUSED, True), ("connect-failure", UPSTREAM_RESET, False), ("reset", UPSTREAM_RESET, True),
    ("reset", REFUSED, True), ("5xx", PER_TRY, True), ("gateway-error", PER_TRY, True),
    ("5xx", UPSTREAM_PROTOCOL_ERROR, True), ("retriable-4xx", REFUSED, False),
])
def test_retry_on_failures_with_no_response(retry_on: str, reply: LocalReply, expected: bool) -> None:
    assert RetryPolicy.from_spec({"retryOn": retry_on}).retriable_failure(reply) is expected


def test_attempts_per_try_timeout_and_backoff_are_read_and_retry_on_defaults_to_istios() -> None:
    p = RetryPolicy.from_spec({"attempts": 0, "perTryTimeout": "250ms"})
    assert (p.attempts, p.per_try_timeout, p.on) == (0, 0.25, DEFAULT_RETRY.on)
    assert RetryPolicy.from_spec({"backoff": "10ms"}).backoff_base == 0.01


def test_backoff_is_fully_jittered_exponential_from_25_ms_capped_at_250_ms() -> None:
    rng = random.Random(7)
    for n, ceiling in ((1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (10, 0.25)):
        waits = [DEFAULT_RETRY.backoff(n, rng.random) for _ in range(2000)]
        assert 0 <= min(waits) and max(waits) <= ceiling and max(waits) > 0.9 * ceiling

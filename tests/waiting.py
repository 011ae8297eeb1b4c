"""How long a test waits for something that must happen, and the one loop that waits for it.

A wait ends as soon as the thing happens; its deadline only expires when the thing never
does. So the deadline is minutes, not how long the thing takes here: these machines are
shared and of varying speed, and whether something is fast enough is a benchmark's question
(bench/), never a test's.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["PATIENCE_S", "wait_until"]

# Long enough that only "it never happened" expires it on any machine the tests run on.
PATIENCE_S = 120.0

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = PATIENCE_S, poll: float = 0.05) -> T:
    """Poll `check` until it returns something true, and return that; AssertionError naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s (last: {got!r})")
        time.sleep(poll)
    return got

"""Reading the recorded calls for the console: blocking analysis in threads, bounded, with a deadline.

The calls are read where the readiness gate reads them (`meshlens control --calls-store URL`: a collector's query
endpoint, or ClickHouse; control/gate.py), through meshlens.analysis, whose reads block: each runs in a thread
(asyncio.to_thread), at most MAX_READS at once so that pages left open cannot queue up work without end, and a page
is answered within READ_TIMEOUT_S whatever the store does. A read past its deadline goes on in its thread and keeps
its slot until it ends (a thread cannot be stopped): the page has its answer, the store is not asked more.
"""
from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from meshlens.collector.stores import Store, StoreError, StoreUnavailable, connect, redact

__all__ = ["MAX_READS", "READ_TIMEOUT_S", "CallsReader", "CallsUnavailable"]

T = TypeVar("T")

MAX_READS = 4  # reads in flight: the collector's query endpoint runs a few at once (query_max_concurrent)
# A page's answer: twice Grafana's data source timeout (30 s), since one service page is several analyses.
READ_TIMEOUT_S = 60.0


class CallsUnavailable(Exception):
    """The calls cannot be read now (no store given, the store away or too slow); one line, and the HTTP status."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class CallsReader:
    """Runs `fn(store)` on a fresh connection to `url` in a thread; CallsUnavailable when that cannot answer."""

    def __init__(self, url: str | None, max_reads: int = MAX_READS, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_reads)

    async def read(self, fn: Callable[[Store], T]) -> T:
        if not self.url:
            raise CallsUnavailable("no calls store: traffic is read where the control plane's --calls-store URL "
                                   "says (a collector's query endpoint), and none was given")
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            raise CallsUnavailable(f"the calls store is still busy with earlier reads after {self.timeout_s:g} s; "
                                   f"try again", 504) from None
        task = asyncio.ensure_future(asyncio.to_thread(_read, self.url, fn))
        task.add_done_callback(lambda _: self._slots.release())  # when the thread ends, not when we stop waiting
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its late error is nobody's
            raise CallsUnavailable(f"the calls store at {redact(self.url)} did not answer within "
                                   f"{self.timeout_s:g} s", 504) from None


def _read(url: str, fn: Callable[[Store], T]) -> T:
    try:
        store = connect(url)
    except ValueError as e:
        raise CallsUnavailable(f"the calls store URL cannot be used: {e}") from None
    try:
        store.use_database()
        return fn(store)
    except StoreUnavailable as e:
        raise CallsUnavailable(str(e)) from None
    except StoreError as e:
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "UNKNOWN_TABLE" in said or "UNKNOWN_DATABASE" in said:
            raise CallsUnavailable(f"the calls store at {redact(url)} has no calls table yet (a collector creates "
                                   f"it when it starts)") from None
        raise CallsUnavailable(f"the calls store at {redact(url)} refused a read: {said[:300]}") from None
    finally:
        store.close()

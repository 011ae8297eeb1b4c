"""Ingestion: accept rows into the spool, batch them, insert them into the store in order.

Producers (the OTLP and call-batch endpoints, from any thread) call `submit`;
it returns once the rows are in the spool, which is what "accepted" means, or
at once for a batch whose id the spool already took (collector/spool.py). One
background thread seals segments (on size or age) and inserts them oldest
first. When the store fails, the segment stays in the spool and the thread
backs off; when it returns, the backlog drains in order. Spans, once spooled, are
also handed to the forwarder when --forward-otlp is set (collector/forward.py).

Backpressure, as producers see it:
  - the backlog passes `max_backlog_bytes` while the store is up: we are behind
    (429, Retry-After);
  - the spool is at its byte limit or the disk is full: 503, Retry-After.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import pyarrow as pa

from meshlens.collector.forward import Forwarder
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.stores.base import quote_ident
from meshlens.collector.spool import Segment, Spool, SpoolFull
from meshlens.collector.stores import Store, StoreError, StoreUnavailable

log = logging.getLogger("meshlens.collector")

# A segment the store refuses (not: cannot be reached) this many times is
# quarantined, so one bad batch cannot block everything behind it.
MAX_REFUSALS = 3
# Back-off between insert attempts while the store is failing: 0.5 s doubling to 30 s.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


class Overloaded(Exception):
    """The collector cannot take this request now; tell the producer when to come back."""

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When a batch is cut, and how much backlog is tolerated."""

    batch_rows: int = 50_000
    flush_interval: float = 1.0
    max_backlog_bytes: int = 256 * 1024 * 1024


class Ingest:
    def __init__(self, store: Store, spool: Spool, database: str, metrics: CollectorMetrics,
                 policy: BatchPolicy = BatchPolicy(), forward: Forwarder | None = None) -> None:
        self.store = store
        self.forward = forward
        self.spool = spool
        self.metrics = metrics
        self.policy = policy
        self._db = quote_ident(database)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened_at: float | None = None
        self._store_up = True
        self._retrying = False  # the last insert failed: wait _backoff before the next
        self._backoff = BACKOFF_MIN
        self._refusals: dict[int, int] = {}
        self._idle = threading.Condition()
        metrics.store_up.set(1)
        self._update_gauges()

    # -- producers -------------------------------------------------------------

    def submit(self, tables: dict[str, pa.Table], endpoint: str, batch_id: str | None = None) -> int | None:
        """Make the rows durable in the spool; raise Overloaded when we cannot take them.

        None when `batch_id` names a batch already accepted (a producer's resend): nothing
        is stored again. That is answered first, even when we are behind: it costs nothing.
        """
        if batch_id is not None and self.spool.has_batch(batch_id):
            self.metrics.duplicate_batches.inc()
            return None
        if self._store_up and self.spool.depth_bytes > self.policy.max_backlog_bytes:
            self.metrics.rejected.labels("backlog").inc()
            raise Overloaded("collector is behind: retry later", 429, 1)
        try:
            rows = self.spool.append(tables, batch_id)
        except SpoolFull as e:
            self.metrics.spool_errors.inc()
            self.metrics.rejected.labels("spool_full").inc()
            raise Overloaded(str(e), 503, max(1, int(self._backoff))) from None
        if rows is None:  # the same id in a request that was spooled since the check above
            self.metrics.duplicate_batches.inc()
            return None
        if self.forward is not None and "otel_traces" in tables:  # accepted, so forwarded
            self.forward.offer(tables["otel_traces"])
        if self._opened_at is None:
            self._opened_at = time.monotonic()
        for name, t in tables.items():
            self.metrics.rows_received.labels(name).inc(t.num_rows)
        self.metrics.batches_received.labels(endpoint).inc()
        if self.spool.open_rows >= self.policy.batch_rows:
            self._wake.set()
        return rows

    # -- the insert thread -----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshlens-ingest", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Seal what is open and try to store the backlog for up to `drain_timeout` seconds."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._seal()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self._drain_once():
            pass

    def flush(self, timeout: float = 30.0) -> bool:
        """Seal now and wait until the spool is empty (tests, shutdown); False on timeout."""
        self._seal()
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.spool.depth_bytes > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def _run(self) -> None:
        tick = min(self.policy.flush_interval, 0.2)
        while not self._stopping.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._due():
                self._seal()
            if self._retrying:
                self._stopping.wait(self._backoff)
            while not self._stopping.is_set() and self._drain_once():
                pass

    def _due(self) -> bool:
        if self.spool.open_rows == 0:
            return False
        if self.spool.open_rows >= self.policy.batch_rows:
            return True
        return self._opened_at is not None and time.monotonic() - self._opened_at >= self.policy.flush_interval

    def _seal(self) -> None:
        self._opened_at = None
        self.spool.seal()
        self._update_gauges()

    def _drain_once(self) -> bool:
        """Insert the oldest sealed segment; True if it went and there may be more."""
        segments = self.spool.sealed()
        if not segments:
            with self._idle:
                self._idle.notify_all()
            return False
        ok = self._insert(segments[0])
        self._update_gauges()
        with self._idle:
            self._idle.notify_all()
        return ok

    def _insert(self, seg: Segment) -> bool:
        try:
            tables = self.spool.read(seg)
        except (OSError, ValueError) as e:  # pa.ArrowInvalid is a ValueError
            log.error("spool segment unreadable path=%s error=%s", seg.path, e)
            self.spool.quarantine(seg)
            return True
        try:
            for name, table in tables.items():
                started = time.perf_counter()
                self.store.insert(f"{self._db}.{name}", table, self.spool.token(seg, name))
                self.metrics.insert_seconds.labels(name).observe(time.perf_counter() - started)
                self.metrics.batches_inserted.labels(name).inc()
                self.metrics.rows_inserted.labels(name).inc(table.num_rows)
        except StoreUnavailable as e:
            self.metrics.insert_errors.labels("unavailable").inc()
            self._failing(f"store unavailable, spooling: {e}", reachable=False)
            return False
        except StoreError as e:
            self.metrics.insert_errors.labels("refused").inc()
            count = self._refusals.get(seg.seq, 0) + 1
            self._refusals[seg.seq] = count
            if count < MAX_REFUSALS:
                self._failing(f"store refused segment {seg.seq} ({count}/{MAX_REFUSALS}): {e}", reachable=True)
                return False
            dest = self.spool.quarantine(seg)
            rows = sum(t.num_rows for t in tables.values())
            self.metrics.dropped_rows.labels("refused").inc(rows)
            log.error("segment quarantined after %d refusals path=%s rows=%d error=%s",
                      count, dest, rows, e)
            self._refusals.pop(seg.seq, None)
            self._retrying = False
            self._backoff = BACKOFF_MIN
            return True
        self.spool.remove(seg)
        self._refusals.pop(seg.seq, None)
        if not self._store_up:
            log.info("store is back, draining spool segments=%d", len(self.spool.sealed()))
        self._store_up = True
        self._retrying = False
        self._backoff = BACKOFF_MIN
        self.metrics.store_up.set(1)
        return True

    def _failing(self, message: str, reachable: bool) -> None:
        """Back off before the next attempt; a store that answered (and refused) is still up."""
        if not self._retrying:
            log.warning(message)  # once per burst of failures, not per attempt
        self._retrying = True
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if not reachable:
            self._store_up = False
            self.metrics.store_up.set(0)

    def _update_gauges(self) -> None:
        self.metrics.spool_bytes.set(self.spool.depth_bytes)
        self.metrics.spool_segments.set(len(self.spool.sealed()))

    @property
    def store_up(self) -> bool:
        return self._store_up

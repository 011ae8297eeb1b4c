"""The producers' side of /v1/calls: a bounded buffer of calls shipped in batches by a thread.

Sidecars and taps call `record(call)` on their hot path: one deque append. A call
is a `Call` or, where a few microseconds a call matter (the proxy), a plain tuple
of its values in CALL_COLUMNS order (`Call.as_row()`). A background thread cuts a
batch every `flush_interval` (or at `batch_rows`), turns it into columns, leaves
out the columns that hold only their default (the collector fills them in), and
POSTs it. Telemetry never slows traffic:

  - the buffer holds at most `max_buffered` calls; past that new calls are
    dropped and counted (`dropped["buffer_full"]`);
  - a batch the collector cannot take now (unreachable, 429, 503) is kept and
    retried after Retry-After, at most `max_pending_batches` of them; the oldest
    is dropped beyond that (`dropped["collector_unavailable"]`);
  - a batch the collector refuses (4xx other than 429) is dropped and counted
    (`dropped["rejected"]`): sending it again would not help.

Failures are logged once per burst, never raised to the caller.
Standard library only: the proxy imports this without pyarrow.
"""
from __future__ import annotations

import gzip
import http.client
import logging
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from meshlens.collector.batch_format import CONTENT_TYPE, encode, omit_defaults
from meshlens.collector.record import CALL_COLUMN_NAMES, Call

log = logging.getLogger("meshlens.client")

# Bodies above this are gzip-compressed: JSON columns of calls shrink ~8x and
# compressing a 64 KiB body costs ~1 ms in the shipping thread, not the caller.
GZIP_ABOVE = 64 * 1024
DEFAULT_URL = "http://127.0.0.1:4318/v1/calls"

# One call's values in CALL_COLUMNS order, as `Call.as_row()` returns them (the proxy
# fills a copy of record.DEFAULT_ROW by position, record.AT: about a third of the cost of
# `Call(**keywords)` on the thread that serves traffic, figures in record.RowPositions),
# and a batch of rows becomes columns in one C-speed zip.
Row = tuple[Any, ...]
Recorded = Call | Row


class CallRecorder:
    """Buffer calls and ship them to a collector; thread-safe, never blocks `record`."""

    def __init__(self, url: str = DEFAULT_URL, *, batch_rows: int = 5_000, flush_interval: float = 1.0,
                 max_buffered: int = 100_000, max_pending_batches: int = 8, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"collector URL must be http://host:port/v1/calls, got {url!r}")
        self.url = url
        self._host, self._port = parts.hostname, parts.port or 80
        self._path = parts.path or "/v1/calls"
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.max_pending_batches = max_pending_batches
        self.timeout = timeout
        # per process: counters read by /stats and metrics endpoints
        self.sent_calls = 0
        self.sent_batches = 0
        self.dropped: dict[str, int] = {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
        # shared between the caller and the shipping thread
        self._buffer: deque[Recorded] = deque()  # append and popleft are atomic: no lock needed
        self._pending: deque[tuple[bytes, int]] = deque()
        # held while a batch is cut: its calls are then in neither deque, and flush() must not see "empty"
        self._cutting = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._retry_at = 0.0
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="meshlens-recorder", daemon=True)
        self._thread.start()

    # -- the hot path ----------------------------------------------------------

    def record(self, call: Recorded) -> None:
        """Queue one call, a `Call` or its row (`Call.as_row()` order); drop and count it when full.

        A row of the wrong length is dropped as "rejected" when its batch is cut, not here:
        the hot path checks nothing it does not have to.
        """
        buf = self._buffer
        if len(buf) >= self.max_buffered:
            self.dropped["buffer_full"] += 1
            return
        buf.append(call)
        if len(buf) == self.batch_rows:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- the shipping thread ---------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._cut()
            self._ship()

    def _cut(self) -> None:
        buf = self._buffer
        if not buf:
            return
        with self._cutting:
            calls = [buf.popleft() for _ in range(min(len(buf), self.batch_rows * 4))]
            columns = self._columns(calls)
            if columns is None:
                return
            body = encode(omit_defaults(columns))
            if len(self._pending) >= self.max_pending_batches:
                _, n = self._pending.popleft()
                self.dropped["collector_unavailable"] += n
            self._pending.append((body, len(next(iter(columns.values())))))

    def _columns(self, calls: list[Recorded]) -> dict[str, list[Any]] | None:
        """Name to values, in CALL_COLUMNS order; None when no call of the batch is left.

        Rows (the proxy) are transposed by zip(*rows): 0.28 µs a call against 1.02 µs
        for a getattr per column and call, measured. Calls alone (the tap, tunnels)
        keep the getattr comprehension: `Call.as_row()` then zip measured slower.
        """
        if tuple not in set(map(type, calls)):
            return {name: [getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES}
        rows = [c if type(c) is tuple else c.as_row() for c in calls]
        width = len(CALL_COLUMN_NAMES)
        if set(map(len, rows)) != {width}:  # a producer's bug: never ship misaligned columns
            bad = sum(len(r) != width for r in rows)
            self.dropped["rejected"] += bad
            log.error("dropped %d recorded rows without exactly %d values (CALL_COLUMNS order)", bad, width)
            rows = [r for r in rows if len(r) == width]
            if not rows:
                return None
        return dict(zip(CALL_COLUMN_NAMES, map(list, zip(*rows))))

    def _ship(self) -> None:
        while self._pending and time.monotonic() >= self._retry_at:
            body, n = self._pending[0]
            status, retry_after, text = self._post(body)
            if status == 200:
                self.sent_calls += n  # counted before the batch leaves _pending, where flush() looks
                self.sent_batches += 1
                self._pending.popleft()
                if self._failing:
                    log.info("collector accepting again url=%s", self.url)
                self._failing = False
            elif 400 <= status < 500 and status != 429:
                self.dropped["rejected"] += n
                self._pending.popleft()
                log.error("collector refused a batch status=%d rows=%d error=%s", status, n, text)
            else:
                if not self._failing:
                    log.warning("collector unavailable, keeping batches url=%s status=%s error=%s",
                                self.url, status, text)
                self._failing = True
                self._retry_at = time.monotonic() + retry_after
                return

    def _post(self, body: bytes) -> tuple[int, float, str]:
        headers = {"Content-Type": CONTENT_TYPE}
        if len(body) > GZIP_ABOVE:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        for attempt in (0, 1):  # a kept-alive connection the server closed gets one fresh retry
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
                self._conn.request("POST", self._path, body, headers)
                resp = self._conn.getresponse()
                text = resp.read().decode("utf-8", "replace")[:200]
                return resp.status, _retry_after(resp.getheader("Retry-After")), text
            except (OSError, http.client.HTTPException) as e:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 1 or isinstance(e, ConnectionRefusedError):
                    return 0, 1.0, _reason(e)
        return 0, 1.0, "unreachable"

    def flush(self, timeout: float = 10.0) -> bool:
        """Ship everything recorded so far; False if the collector did not take it in time.

        Retry-After still holds: flushing (as `close` does) must not hammer a collector that is behind.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._settled():
                return True
            self._wake.set()
            time.sleep(0.02)
        return self._settled()

    def _settled(self) -> bool:
        with self._cutting:
            return not self._buffer and not self._pending

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()


def _retry_after(value: str | None) -> float:
    try:
        return min(60.0, max(0.1, float(value))) if value else 1.0
    except ValueError:
        return 1.0


def _reason(e: BaseException) -> str:
    """A connection failure in words for the log ("connection refused"), not "[Errno 111] ..."."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e) or type(e).__name__

"""The producers' side of /v1/calls: a bounded buffer of calls shipped in batches by a thread.

Sidecars and taps call `record(call)` on their hot path: one list append.
A background thread cuts a batch every `flush_interval` (or at `batch_rows`),
turns it into columns, and POSTs it. Telemetry never slows traffic:

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

from collector.batch_format import CONTENT_TYPE, encode
from collector.record import CALL_COLUMNS, Call

log = logging.getLogger("meshlens.client")

# Bodies above this are gzip-compressed: JSON columns of calls shrink ~8x and
# compressing a 64 KiB body costs ~1 ms in the shipping thread, not the caller.
GZIP_ABOVE = 64 * 1024
DEFAULT_URL = "http://127.0.0.1:4318/v1/calls"
_NAMES = tuple(c.name for c in CALL_COLUMNS)


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
        self._buffer: deque[Call] = deque()  # append and popleft are atomic: no lock needed
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

    def record(self, call: Call) -> None:
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
            columns: dict[str, list[Any]] = {name: [getattr(c, name) for c in calls] for name in _NAMES}
            body = encode(columns)
            if len(self._pending) >= self.max_pending_batches:
                _, n = self._pending.popleft()
                self.dropped["collector_unavailable"] += n
            self._pending.append((body, len(calls)))

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
                    return 0, 1.0, str(e)
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

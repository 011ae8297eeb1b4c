"""The producers' side of /v1/calls: calls buffered, cut into batches and shipped by one thread.

Sidecars and taps call `record(call)` on their hot path: one deque append. A call
is a `Call` or, where a few microseconds a call matter (the proxy), a plain tuple
of its values in CALL_COLUMNS order (`Call.as_row()`). A background thread cuts a
batch at `batch_rows` calls (or what there is every `flush_interval`), encodes it
once with an id of its own (collector/batch_format.py: columns that hold only their
default left out, columns of one value sent once) and POSTs it. Telemetry never
slows traffic:

  - the thread shares the interpreter with the server it records for: it works in
    slices of SLICE_ROWS calls and lets go of the interpreter lock after each, so
    it never holds it much longer than a slice takes (bench/recorder.py), whatever
    the batch;
  - calls not yet cut are at most `max_buffered`; past that new calls are dropped
    and counted (`dropped["buffer_full"]`). While the collector is away the thread
    cuts everything into the unsent batches, so this bound only bites when the
    thread cannot keep up;
  - batches cut and not acknowledged (`unsent_calls`) are kept up to
    `max_unsent_calls` calls; the oldest batch is dropped beyond that
    (`dropped["collector_unavailable"]`);
  - a batch the collector cannot take now (unreachable, no answer, 429, 503) is
    resent, with the same id, after Retry-After or a short backoff; once it answers
    again the backlog goes back to back. The collector stores an id once, so a batch
    whose answer was lost is not stored twice (`duplicate_batches` counts those it
    already had);
  - a batch the collector refuses (4xx other than 429) is dropped and counted
    (`dropped["rejected"]`): sending it again would not help.

Failures are logged once per burst, never raised to the caller.
Standard library only: the proxy imports this without pyarrow.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import secrets
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshlens.collector.batch_format import CONTENT_TYPE, encode_slices
from meshlens.collector.record import CALL_COLUMN_NAMES, Call

log = logging.getLogger("meshlens.client")

# Bodies above this are gzip-compressed, once, when the batch is cut, unless the collector
# is on a loopback address: a proxy batch shrinks 2.3x (its ids are random; what repeats is
# already sent once) for ~2 µs a call of the thread's CPU (zlib lets go of the interpreter
# lock, but not of the core), measured: worth it on a network, not on loopback.
GZIP_ABOVE = 64 * 1024
DEFAULT_URL = "http://127.0.0.1:4318/v1/calls"
# Calls kept unsent: two minutes of a busy sidecar (1,000 calls/s), so a collector
# restart or rolling upgrade (tens of seconds) loses nothing, with room for one twice
# as long; ~145 bytes a proxy call as encoded (~17 MB full), ~65 gzipped, measured.
MAX_UNSENT_CALLS = 120_000
# Calls the shipping thread handles between two releases of the interpreter lock: at most
# 0.44-0.64 ms of its work on the project's machine (256 held it 0.8-0.95 ms; 64 gave no
# shorter stall, at a higher cost a call), bench/recorder.py.
SLICE_ROWS = 128
# A body goes out (and through gzip) in chunks of about this size: joining 64 KiB holds the
# interpreter lock for tens of µs, and a 5,000-call body is a dozen sends, not hundreds.
CHUNK_BYTES = 64 * 1024
# Back-off while the collector is unreachable or does not answer, without Retry-After:
# a restarted collector is noticed within RETRY_MAX_S, and a refused connection costs
# the thread ~0.1 ms, so polling every 2 s is nothing.
RETRY_MIN_S, RETRY_MAX_S = 0.1, 2.0

# One call's values in CALL_COLUMNS order, as `Call.as_row()` returns them (the proxy
# fills a copy of record.DEFAULT_ROW by position, record.AT: about a third of the cost of
# `Call(**keywords)` on the thread that serves traffic, figures in record.RowPositions),
# and a slice of rows becomes columns in one C-speed zip.
Row = tuple[Any, ...]
Recorded = Call | Row
_WIDTH = len(CALL_COLUMN_NAMES)


def pause() -> None:
    """Let go of the interpreter lock so that the server's thread runs if it is waiting.

    sleep(0) releases and retakes it; a thread waiting for it gets it first: measured, a
    loop of 0.6 ms steps let a busy main thread in after each step as often, and as soon,
    as with a 10-200 µs sleep between them, without the sleeps' wall time."""
    time.sleep(0)


@dataclass(frozen=True, slots=True)
class Unsent:
    """A batch cut and encoded, kept until the collector acknowledges it; resent as it is.

    The body stays in chunks of about CHUNK_BYTES: joining them would hold the interpreter
    lock for a copy of the whole body (milliseconds, measured)."""

    batch_id: str
    body: tuple[bytes, ...]
    size: int
    gzipped: bool
    calls: int


class CallRecorder:
    """Buffer calls and ship them to a collector; thread-safe, never blocks `record`."""

    def __init__(self, url: str = DEFAULT_URL, *, batch_rows: int = 5_000, flush_interval: float = 1.0,
                 max_buffered: int = 100_000, max_unsent_calls: int = MAX_UNSENT_CALLS,
                 timeout: float = 5.0, compress: bool | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"collector URL must be http://host:port/v1/calls, got {url!r}")
        self.url = url
        self._host, self._port = parts.hostname, parts.port or 80
        self._path = parts.path or "/v1/calls"
        self.compress = not is_loopback(self._host) if compress is None else compress
        """Whether bodies above GZIP_ABOVE are gzipped: by default, unless the collector is on loopback."""
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.max_buffered = max_buffered
        self.max_unsent_calls = max_unsent_calls
        self.timeout = timeout
        # per process: the id that makes this recorder's batch ids unique, and counters
        # read by /stats and metrics endpoints
        self.producer_id = secrets.token_hex(8)
        self.sent_calls = 0
        self.sent_batches = 0
        self.duplicate_batches = 0
        self.dropped: dict[str, int] = {"buffer_full": 0, "collector_unavailable": 0, "rejected": 0}
        # shared between the caller and the shipping thread
        self._buffer: deque[Recorded] = deque()  # append and popleft are atomic: no lock needed
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = False
        # held while a batch is cut: its calls are then in neither deque, and flush() must not see "empty"
        self._cutting = threading.Lock()
        # the shipping thread's own
        self._unsent: deque[Unsent] = deque()
        self._unsent_calls = 0
        self._seq = 0
        self._cut_at = time.monotonic() + flush_interval
        self._failing = False
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="meshlens-recorder", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"<CallRecorder {self.url} buffered={self.buffered} unsent_calls={self.unsent_calls}"
                f" failing={self._failing}>")

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
        """Calls recorded and not yet cut into a batch."""
        return len(self._buffer)

    @property
    def unsent_calls(self) -> int:
        """Calls cut into batches the collector has not acknowledged yet (kept, and resent)."""
        return self._unsent_calls

    # -- the shipping thread ---------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._idle_for())
            self._wake.clear()
            try:
                self._cut_due()
                while self._unsent and time.monotonic() >= self._retry_at and not self._stop.is_set():
                    self._ship(self._unsent[0])
                    self._cut_due()
            except Exception:  # our bug: say so loudly, and keep recording rather than die silently
                log.exception("recorder failed, carrying on url=%s", self.url)
                self._stop.wait(RETRY_MAX_S)

    def _idle_for(self) -> float:
        """Seconds until something is due: a partial batch, or the next try of an unsent one."""
        due = self._cut_at
        if self._unsent:
            due = min(due, self._retry_at)
        return max(0.0, due - time.monotonic())

    def _cut_due(self) -> None:
        """Cut what is due into unsent batches.

        While the collector answers, one batch at a time, when the last one went: the
        buffer is then what waits, and what a producer that can wait watches (the tap
        reading a file). While it does not, everything, so the buffer stays empty and
        the unsent bound, sized for an outage, is the one that holds.
        """
        buf = self._buffer
        with self._cutting:
            while buf and (self._failing or not self._unsent):
                if len(buf) >= self.batch_rows:
                    self._cut(self.batch_rows)
                elif self._flushing or time.monotonic() >= self._cut_at:
                    self._cut(len(buf))
                    self._cut_at = time.monotonic() + self.flush_interval
                else:
                    break
        if not buf and time.monotonic() >= self._cut_at:
            self._cut_at = time.monotonic() + self.flush_interval

    def _cut(self, n: int) -> None:
        batch_id = f"{self.producer_id}-{self._seq}"
        self._seq += 1
        bad = [0]
        try:
            body = encode_slices(CALL_COLUMN_NAMES, self._slices(n, bad), batch_id, pause)
        except (TypeError, ValueError, RecursionError) as e:  # a value JSON cannot carry: a producer's bug
            self.dropped["rejected"] += n - bad[0]
            log.error("dropped a batch that cannot be encoded rows=%d error=%s", n - bad[0], e)
            return
        calls = n - bad[0]
        if not calls:
            return
        body = _coalesce(body)
        size = sum(map(len, body))
        gzipped = self.compress and size > GZIP_ABOVE
        if gzipped:
            body = _gzip(body)
            size = sum(map(len, body))
        while self._unsent and self._unsent_calls + calls > self.max_unsent_calls:
            oldest = self._unsent.popleft()
            self._unsent_calls -= oldest.calls
            self.dropped["collector_unavailable"] += oldest.calls
        self._unsent.append(Unsent(batch_id, tuple(body), size, gzipped, calls))
        self._unsent_calls += calls

    def _slices(self, n: int, bad: list[int]) -> Iterator[Sequence[Sequence[Any]]]:
        """The next `n` calls off the buffer as columns, SLICE_ROWS at a time; misshapen rows counted in `bad`.

        Rows (the proxy) are transposed by zip(*rows): 0.28 µs a call against 1.02 µs
        for a getattr per column and call, measured. Calls alone (the tap, tunnels)
        keep the getattr comprehension: `Call.as_row()` then zip measured slower.
        """
        pop = self._buffer.popleft
        while n > 0:
            k = min(n, SLICE_ROWS)
            n -= k
            calls = [pop() for _ in range(k)]
            kinds = set(map(type, calls))
            if kinds == {tuple} and set(map(len, calls)) == {_WIDTH}:
                yield list(zip(*calls))
                continue
            if kinds == {Call}:
                yield [[getattr(c, name) for c in calls] for name in CALL_COLUMN_NAMES]
                continue
            rows = [c.as_row() if isinstance(c, Call) else c for c in calls]
            good = [r for r in rows if type(r) is tuple and len(r) == _WIDTH]
            if len(good) < len(rows):  # a producer's bug: never ship misaligned columns
                bad[0] += len(rows) - len(good)
                self.dropped["rejected"] += len(rows) - len(good)
                log.error("dropped %d recorded rows without exactly %d values (CALL_COLUMNS order)",
                          len(rows) - len(good), _WIDTH)
            if good:
                yield list(zip(*good))

    def _ship(self, batch: Unsent) -> None:
        status, retry_after, text = self._post(batch)
        if status == 200:
            if _duplicate(text):
                self.duplicate_batches += 1
            self.sent_calls += batch.calls  # counted before the batch leaves _unsent, where flush() looks
            self.sent_batches += 1
            self._forget(batch)
            if self._failing:
                log.info("collector accepting again url=%s unsent_calls=%d", self.url, self._unsent_calls)
            self._failing = False
            self._backoff = RETRY_MIN_S
        elif 400 <= status < 500 and status != 429:
            self.dropped["rejected"] += batch.calls
            self._forget(batch)
            log.error("collector refused a batch status=%d rows=%d error=%s", status, batch.calls, text[:200])
        else:
            if not self._failing:
                log.warning("collector unavailable, keeping batches url=%s status=%s error=%s",
                            self.url, status, text[:200])
            self._failing = True
            self._retry_at = time.monotonic() + (retry_after if retry_after is not None else self._backoff)
            self._backoff = min(RETRY_MAX_S, self._backoff * 2)

    def _forget(self, batch: Unsent) -> None:
        if self._unsent and self._unsent[0] is batch:
            self._unsent.popleft()
            self._unsent_calls -= batch.calls

    def _post(self, batch: Unsent) -> tuple[int, float | None, str]:
        """(status, Retry-After in seconds or None, body text); status 0 when there was no answer."""
        headers = {"Content-Type": CONTENT_TYPE, "Content-Length": str(batch.size)}
        if batch.gzipped:
            headers["Content-Encoding"] = "gzip"
        for attempt in (0, 1):  # a kept-alive connection the server closed gets one fresh retry
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
                self._conn.request("POST", self._path, batch.body, headers)
                resp = self._conn.getresponse()
                text = resp.read().decode("utf-8", "replace")
                return resp.status, parse_retry_after(resp.getheader("Retry-After")), text
            except (OSError, http.client.HTTPException) as e:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 1 or isinstance(e, (ConnectionRefusedError, TimeoutError)):
                    return 0, None, failure_reason(e)
        return 0, None, "unreachable"

    def flush(self, timeout: float = 10.0) -> bool:
        """Ship everything recorded so far; False if the collector did not take it in time.

        Retry-After and the backoff still hold: flushing (as `close` does) must not
        hammer a collector that is behind or away.
        """
        deadline = time.monotonic() + timeout
        self._flushing = True
        try:
            while time.monotonic() < deadline:
                if self._settled():
                    return True
                self._wake.set()
                time.sleep(0.02)
            return self._settled()
        finally:
            self._flushing = False

    def _settled(self) -> bool:
        with self._cutting:
            return not self._buffer and not self._unsent

    def close(self, timeout: float = 5.0) -> None:
        if not self.flush(timeout):
            log.warning("closing with calls the collector did not take url=%s buffered=%d unsent_calls=%d",
                        self.url, self.buffered, self._unsent_calls)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._conn is not None:
            self._conn.close()


def _coalesce(pieces: list[bytes]) -> list[bytes]:
    """A body's pieces (one a column and slice, hundreds) joined into chunks of about CHUNK_BYTES."""
    out: list[bytes] = []
    group: list[bytes] = []
    held = 0
    for piece in pieces:
        group.append(piece)
        held += len(piece)
        if held >= CHUNK_BYTES:
            out.append(b"".join(group))
            group, held = [], 0
            pause()
    if group:
        out.append(b"".join(group))
    return out


def _gzip(chunks: list[bytes]) -> list[bytes]:
    """The chunks as one gzip stream, in chunks; zlib lets go of the lock while it works, pause() between."""
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    out = []
    for chunk in chunks:
        if compressed := gz.compress(chunk):
            out.append(compressed)
        pause()
    out.append(gz.flush())
    return out


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (localhost or a loopback address; a name is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: resolved per connection, maybe elsewhere
        return False


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After's seconds, kept within 0.1 to 60; None when absent or not a number (a date: use the backoff)."""
    try:
        return min(60.0, max(0.1, float(value))) if value else None
    except ValueError:
        return None


def _duplicate(text: str) -> bool:
    """Whether the collector's answer says it already had the batch."""
    try:
        return json.loads(text).get("duplicate") is True
    except (ValueError, AttributeError):
        return False


def failure_reason(e: BaseException) -> str:
    """A connection failure in words for the log ("connection refused"), not "[Errno 111] ..."."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e) or type(e).__name__

"""Every span the collector accepts, also sent by OTLP/HTTP to another endpoint (Jaeger, Tempo, a Collector).

Spans received by OTLP and the spans made from call records with trace context both
reach `otel_traces`, so the forwarder reads that one shape: `Ingest.submit` hands
each accepted `otel_traces` table to `Forwarder.offer` once it is in the spool (a
producer's resend, answered from the spool, is not offered twice). Forwarding never
slows ingestion:

  - `offer` is an append under a lock to a queue bounded in spans
    (`forward_queue_spans`, counting the batch being sent). When it is full the
    *newest* spans are dropped and counted (`queue_full`), as the OpenTelemetry SDK's
    batch processor and the Collector's sending queue do: the hand-off then costs
    nothing when full, and what is queued goes out in the order it was accepted;
  - one thread cuts batches of BATCH_SPANS (or what there is after SEND_DELAY_S),
    encodes them and POSTs them to `{URL}/v1/traces` (application/x-protobuf);
  - OTLP's retryable answers (no connection, 429, 502, 503, 504) are retried after
    Retry-After or a backoff, for as long as it takes (new spans meanwhile queue up
    to the bound); any other status drops the batch (`rejected`), as do the spans a
    receiver refuses in `partial_success`;
  - ids OTLP cannot carry (a call record's trace context that is not hex of the right
    length) are dropped when the batch is encoded (`invalid`);
  - on stop, what is queued is sent back to back for up to DRAIN_S; the rest is
    counted `shutdown`. (`error` counts a batch our own bug could not send, logged
    with its traceback.)

The queue is in memory: spans accepted and not yet forwarded when the collector dies
are stored locally but never forwarded. Failures are logged once per burst.
"""
from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meshlens import __version__
from meshlens.collector.client import failure_reason, parse_retry_after
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.otlp import SPAN_KINDS, STATUS_CODES, LazyRequest

log = logging.getLogger("meshlens.collector.forward")

TRACES_PATH = "/v1/traces"
# The OpenTelemetry SDK batch span processor's max_export_batch_size: a body of a few
# hundred KB, well under every receiver's limit (the Collector's 20 MiB, ours).
BATCH_SPANS = 512
# The Collector batch processor's default timeout: a partial batch waits this long for company.
SEND_DELAY_S = 0.2
# Back-off without Retry-After: a receiver back from a restart is noticed within RETRY_MAX_S.
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
# What stop() spends sending what is queued: well inside a SIGTERM grace period (Kubernetes' 30 s),
# beside the spool's own drain into the store.
DRAIN_S = 5.0
# OTLP/HTTP, "Retryable Response Codes": 429, 502, 503, 504 SHOULD be retried; "all other 4xx or 5xx
# response status codes MUST NOT be retried" (500 included).
RETRYABLE = frozenset({429, 502, 503, 504})
DROP_REASONS = ("queue_full", "rejected", "invalid", "shutdown", "error")

_KIND = {word: number for number, word in SPAN_KINDS.items()}
_STATUS = {word: number for number, word in STATUS_CODES.items()}
_U64_MAX = 2**64 - 1


def traces_url(url: str) -> str:
    """The URL spans are POSTed to: `url` as is when it ends in /v1/traces, else with it appended,
    as the OpenTelemetry exporters read their traces and base endpoints. ValueError when unusable."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError as e:
        raise ValueError(f"forward_otlp {url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"forward_otlp must be http(s)://host[:port][/path], e.g. http://tempo:4318, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return parts._replace(path=path).geturl()


# -- otel_traces rows to OTLP ----------------------------------------------------------


def encode(table: pa.Table) -> tuple[bytes, int, int]:
    """An ExportTraceServiceRequest of `table`'s rows: (body, spans in it, spans left out as invalid).

    Written through LazyRequest (collector/otlp.py), the decoder's own layout, whose
    nested messages are bytes: each distinct attribute, resource, scope and status is
    serialised once a batch, and the body is byte for byte an ExportTraceServiceRequest.
    Attributes are strings, as otel_traces holds them (pdata's AsString).
    """
    col = table.column
    attribute = _Attributes()
    start = col("Timestamp").cast(pa.int64()).to_pylist()
    ev_time = col("Events.Timestamp").cast(pa.list_(pa.int64())).to_pylist()
    rows = zip(start, col("Duration").to_pylist(), col("TraceId").to_pylist(), col("SpanId").to_pylist(),
               col("ParentSpanId").to_pylist(), col("TraceState").to_pylist(), col("SpanName").to_pylist(),
               col("SpanKind").to_pylist(), col("ServiceName").to_pylist(), _pairs(col("ResourceAttributes")),
               col("ScopeName").to_pylist(), col("ScopeVersion").to_pylist(),
               _pairs(col("SpanAttributes"), attribute.__getitem__),
               col("StatusCode").to_pylist(), col("StatusMessage").to_pylist(),
               ev_time, col("Events.Name").to_pylist(), col("Events.Attributes").to_pylist(),
               col("Links.TraceId").to_pylist(), col("Links.SpanId").to_pylist(),
               col("Links.TraceState").to_pylist(), col("Links.Attributes").to_pylist())
    request = LazyRequest()
    scopes: dict[tuple[Any, ...], Any] = {}  # (service, resource, scope name, version) -> its ScopeSpans.spans
    resources: dict[tuple[Any, ...], Any] = {}
    statuses: dict[tuple[str, str], bytes] = {}
    sent = invalid = 0
    for (t, duration, tid, sid, pid, state, name, kind, service, resource, scope_name, scope_version, attrs,
         status_code, status_message, ev_t, ev_name, ev_attrs, ln_tid, ln_sid, ln_state, ln_attrs) in rows:
        ids = _ids(tid, sid, pid)
        if ids is None or t < 0:
            invalid += 1
            continue
        key = (service, tuple(resource), scope_name, scope_version)
        spans = scopes.get(key)
        if spans is None:
            rs = resources.get(key[:2])
            if rs is None:
                rs = resources[key[:2]] = request.resource_spans.add()
                rs.resource = _resource(service, resource)
            ss = rs.scope_spans.add()
            ss.scope = InstrumentationScope(name=scope_name, version=scope_version).SerializeToString()
            spans = scopes[key] = ss.spans
        sp = spans.add()
        sp.trace_id, sp.span_id, sp.parent_span_id = ids
        sp.trace_state, sp.name, sp.kind = state, name, _KIND.get(kind, 0)
        sp.start_time_unix_nano, sp.end_time_unix_nano = t, min(t + duration, _U64_MAX)
        sp.attributes.extend(attrs)
        status = statuses.get((status_code, status_message))
        if status is None:
            status = statuses[(status_code, status_message)] = Status(
                code=_STATUS.get(status_code, 0), message=status_message).SerializeToString()
        sp.status = status
        if ev_t:
            sp.events.extend(Span.Event(time_unix_nano=et, name=en, attributes=_key_values(ea)).SerializeToString()
                             for et, en, ea in zip(ev_t, ev_name, ev_attrs))
        if ln_tid:
            sp.links.extend(Span.Link(trace_id=_id(lt), span_id=_id(ls), trace_state=lst,
                                      attributes=_key_values(la)).SerializeToString()
                            for lt, ls, lst, la in zip(ln_tid, ln_sid, ln_state, ln_attrs))
        sent += 1
    return request.SerializeToString(), sent, invalid


def _pairs(column: pa.ChunkedArray, each: Callable[[tuple[str, str]], Any] | None = None) -> list[list[Any]]:
    """A map column's rows as lists of (key, value), or of `each(pair)`.

    Read from the flat keys and values: Arrow's own to_pylist builds each pair through
    scalars: ~0.8 us a pair against ~0.2 (measured; attributes are most of a span)."""
    rows: list[list[Any]] = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_pylist()  # into the whole child arrays, even for a slice
        first, last = offsets[0], offsets[-1]
        pairs: list[Any] = list(zip(chunk.keys.slice(first, last - first).to_pylist(),
                                    chunk.items.slice(first, last - first).to_pylist()))
        if each is not None:
            pairs = list(map(each, pairs))
        rows.extend(pairs[a - first:b - first] for a, b in zip(offsets, offsets[1:]))
    return rows


class _Attributes(dict[tuple[str, str], bytes]):
    """(key, value) -> the KeyValue's wire bytes, serialised once per distinct pair in a batch."""

    def __missing__(self, pair: tuple[str, str]) -> bytes:
        raw = self[pair] = KeyValue(key=pair[0], value=AnyValue(string_value=pair[1])).SerializeToString()
        return raw


def _key_values(pairs: Iterable[tuple[str, str]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs]


def _resource(service: str, attributes: list[tuple[str, str]]) -> bytes:
    """The resource's wire bytes; service.name added from ServiceName when the map lacks it (a receiver reads it there)."""
    pairs = list(attributes)
    if service and not any(k == "service.name" for k, _ in pairs):
        pairs.insert(0, ("service.name", service))
    return Resource(attributes=_key_values(pairs)).SerializeToString()


def _ids(tid: str, sid: str, pid: str) -> tuple[bytes, bytes, bytes] | None:
    """The span's ids as bytes, or None when OTLP cannot carry them (the receiver would refuse the span)."""
    try:
        t, s, p = bytes.fromhex(tid), bytes.fromhex(sid), bytes.fromhex(pid)
    except ValueError:
        return None
    if len(t) != 16 or len(s) != 8 or not t.strip(b"\0") or not s.strip(b"\0") or len(p) not in (0, 8):
        return None
    return t, s, p


def _id(hex_id: str) -> bytes:
    """A link's id: '' (the decoder's word for an empty or zero id) and anything unreadable go as empty."""
    try:
        return bytes.fromhex(hex_id)
    except ValueError:
        return b""


# -- the queue and its sender ----------------------------------------------------------


class Forwarder:
    """A bounded queue of accepted spans and the thread that sends them to `url` (see the module's docstring)."""

    def __init__(self, url: str, metrics: CollectorMetrics, max_spans: int, timeout: float) -> None:
        self.url = traces_url(url)
        parts = urlsplit(self.url)
        self._connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._path = parts.hostname or "", parts.port, parts.path
        self.max_spans = max_spans
        self.timeout = timeout
        self.metrics = metrics
        for reason in DROP_REASONS:
            metrics.forward_dropped.labels(reason)
        # shared with the producers (offer), under _cond
        self._cond = threading.Condition()
        self._queue: deque[pa.Table] = deque()
        self._queued = 0  # spans in _queue
        self._in_flight = 0  # spans taken by the sender and not yet done with
        self._first_at = 0.0  # when the oldest queued span arrived
        self._deadline: float | None = None  # set by stop(): drain until then
        self._wake = threading.Event()  # cuts a retry's wait short on stop()
        metrics.forward_queue_spans.set_function(lambda: self._queued + self._in_flight)
        # the sender's own
        self._conn: http.client.HTTPConnection | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="meshlens-forward", daemon=True)

    def __repr__(self) -> str:
        return f"<Forwarder {self.url} queued={self._queued} in_flight={self._in_flight} failing={self._failing}>"

    def offer(self, table: pa.Table) -> None:
        """Queue accepted spans; those beyond the bound are dropped and counted. Called on the ingest path."""
        with self._cond:
            room = self.max_spans - self._queued - self._in_flight
            n = table.num_rows
            if n > room:
                self.metrics.forward_dropped.labels("queue_full").inc(n - max(room, 0))
                if room <= 0:
                    return
                table, n = table.slice(0, room), room
            first = not self._queue
            if first:
                self._first_at = time.monotonic()
            self._queue.append(table)
            self._queued += n
            if first or self._queued >= BATCH_SPANS:  # the sender then starts its delay, or sends now
                self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: float = DRAIN_S) -> None:
        """Send what is queued for up to `drain` seconds; count what is left as dropped (`shutdown`)."""
        with self._cond:
            self._deadline = time.monotonic() + drain
            self._cond.notify()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(drain + 1.0)  # a connect or send is bounded by the deadline too
        with self._cond:
            left = self._queued + self._in_flight
            self._queue.clear()
            self._queued = self._in_flight = 0
        if left:
            self.metrics.forward_dropped.labels("shutdown").inc(left)
            log.warning("stopped with spans not forwarded url=%s spans=%d", self.url, left)
        if self._conn is not None:
            self._conn.close()

    # -- the sender thread -----------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                done = self._deliver(batch)
            except Exception:  # our bug: say so loudly, count the batch, and keep forwarding
                log.exception("forwarding a batch failed url=%s spans=%d", self.url, batch.num_rows)
                self.metrics.forward_dropped.labels("error").inc(batch.num_rows)
                done = True
            if not done:  # the stop deadline passed: stop() counts what is held
                return
            with self._cond:
                self._in_flight = 0

    def _next_batch(self) -> pa.Table | None:
        """Wait for a batch: BATCH_SPANS queued, the oldest SEND_DELAY_S old, or stopping; None when done."""
        with self._cond:
            while True:
                stopping = self._deadline is not None
                if stopping and (not self._queue or time.monotonic() >= self._deadline):  # type: ignore[operator]
                    return None
                if self._queue:
                    wait = self._first_at + SEND_DELAY_S - time.monotonic()
                    if stopping or self._queued >= BATCH_SPANS or wait <= 0:
                        return self._take()
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def _take(self) -> pa.Table:
        """Up to BATCH_SPANS spans off the queue, as one table (its pieces unchanged: no copy)."""
        pieces, n = [], 0
        while self._queue and n < BATCH_SPANS:
            t = self._queue.popleft()
            if n + t.num_rows > BATCH_SPANS:
                rest = t.slice(BATCH_SPANS - n)
                t = t.slice(0, BATCH_SPANS - n)
                self._queue.appendleft(rest)
            pieces.append(t)
            n += t.num_rows
        self._queued -= n
        self._in_flight = n
        self._first_at = time.monotonic()
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)

    def _deliver(self, batch: pa.Table) -> bool:
        """Send one batch until it is taken or refused; False if the stop deadline came first."""
        body, spans, invalid = encode(batch)
        if invalid:
            self.metrics.forward_dropped.labels("invalid").inc(invalid)
        if not spans:
            return True
        backoff = RETRY_MIN_S
        while True:
            status, retry_after, payload = self._post(body)
            if status == 200:
                self._accepted(spans, payload)
                return True
            if status not in RETRYABLE and status != 0:
                self.metrics.forward_dropped.labels("rejected").inc(spans)
                if not self._failing:
                    log.error("forward endpoint refused a batch url=%s status=%d spans=%d error=%s",
                              self.url, status, spans, _status_message(payload))
                self._failing = True
                return True
            self.metrics.forward_retries.labels(str(status) if status else "unreachable").inc()
            if not self._failing:
                log.warning("forward endpoint unavailable, retrying url=%s status=%s error=%s",
                            self.url, status or "none", _status_message(payload))
            self._failing = True
            wait = retry_after if retry_after is not None else backoff
            backoff = min(RETRY_MAX_S, backoff * 2)
            if self._deadline is None:
                self._wake.wait(wait)  # stop() cuts it short
            else:  # draining: _wake stays set, so sleep, within the deadline
                wait = min(wait, self._deadline - time.monotonic())
                if wait <= 0:
                    return False
                time.sleep(wait)

    def _accepted(self, spans: int, payload: bytes) -> None:
        rejected, error = 0, ""
        try:
            partial = ExportTraceServiceResponse.FromString(payload).partial_success
            rejected, error = min(spans, max(0, partial.rejected_spans)), partial.error_message
        except DecodeError:
            pass  # not ours to judge: the spans were taken
        self.metrics.forward_batches.inc()
        self.metrics.forward_spans.inc(spans - rejected)
        if rejected:
            self.metrics.forward_dropped.labels("rejected").inc(rejected)
            log.warning("forward endpoint refused spans url=%s spans=%d error=%s", self.url, rejected, error[:200])
        elif self._failing:
            log.info("forward endpoint accepting again url=%s", self.url)
        self._failing = bool(rejected)

    def _post(self, body: bytes) -> tuple[int, float | None, bytes]:
        """(status, Retry-After in seconds or None, body); status 0 when there was no answer."""
        headers = {"Content-Type": "application/x-protobuf", "User-Agent": f"meshlens-collector/{__version__}"}
        timeout = self.timeout
        if self._deadline is not None:
            timeout = max(0.1, min(timeout, self._deadline - time.monotonic()))
        for attempt in (0, 1):  # a kept-alive connection the receiver closed gets one fresh retry
            try:
                if self._conn is None:
                    self._conn = self._connection(self._host, self._port, timeout=timeout)
                elif self._conn.sock is not None:
                    self._conn.sock.settimeout(timeout)
                self._conn.request("POST", self._path, body, headers)
                resp = self._conn.getresponse()
                return resp.status, parse_retry_after(resp.getheader("Retry-After")), resp.read()
            except (OSError, http.client.HTTPException) as e:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt == 1 or isinstance(e, (ConnectionRefusedError, TimeoutError)):
                    return 0, None, failure_reason(e).encode()
        return 0, None, b"unreachable"


def _status_message(payload: bytes) -> str:
    """The receiver's reason in one short line: a google.rpc.Status's message, else the body's text."""
    try:
        message = status_pb2.Status.FromString(payload).message
    except DecodeError:
        message = ""
    text = message or payload.decode("utf-8", "replace")
    return " ".join(text.split())[:200]

"""The audit trail shipped to a collector's `mesh_changes`, after each change and at start.

The store's transaction is the truth: a change is stored and answered before anything
here happens, and nothing here can slow or fail it. One task in the control plane's
event loop (`ChangeShipper`):

  - reads the audit entries after the last revision the collector acknowledged, oldest
    first and in whole revisions (`Store.changes_after`); where it stands is kept in the
    store (`Store.acknowledged`), per collector URL, so a restarted control plane or
    another replica resumes there, and what changed while the collector was away or the
    control plane ran without one is shipped later;
  - POSTs them, SHIP_BATCH at a time, to the collector's /v1/changes
    (collector/changes.py), which answers 200 once they are in its spool;
  - while the collector is away (no answer, 429, 503, any 5xx, or no /v1/changes yet),
    keeps them and tries again after Retry-After or a backoff (collector/client.py's
    RETRY_MIN_S doubling to RETRY_MAX_S), saying so once per outage;
  - a change the collector refuses (400, 413), sent alone, is logged and passed over: it
    stays in the control plane's history, and one row the collector cannot take must not
    hold up every later one;
  - caught up, waits for the store's next change (`Store.wait`: on etcd a watch, so what
    another replica changed is shipped too).

Where it stands is written to the store when caught up, at most once every
ACK_WRITE_INTERVAL_S, and at stop: on etcd every write moves the revision that each
sidecar's snapshot is versioned by, and costs each sidecar an identical snapshot. After a
crash, what was shipped since the last write is shipped again, as two replicas over one
etcd both ship everything: the collector stores each change once (its id, then
mesh_changes' key), so readers see it once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from meshlens.collector.changes import MeshChange
from meshlens.collector.client import (GZIP_ABOVE, RETRY_MAX_S, RETRY_MIN_S, failure_reason, is_loopback,
                                       parse_retry_after)
from meshlens.control.store import AuditEntry, Store, StoreUnavailable
from meshlens.policy.networking import service_of

__all__ = ["ACK_WRITE_INTERVAL_S", "SHIP_BATCH", "ChangeShipper", "changes_url", "mesh_change", "service_of_change"]

log = logging.getLogger("meshlens.control")

# Changes a request: changes come a few a minute; a catch-up after a long outage goes 100 at a time.
SHIP_BATCH = 100
# A request's body stops growing past this (one change alone may be larger: a document is up to
# collector/changes.py's MAX_DOCUMENT_BYTES, twice); far under the collector's 20 MiB max body.
SHIP_BYTES = 4 * 1024 * 1024
# How often at most where shipping stands is written to the store (see the module's docstring):
# a crash ships again at most this much of the trail, which the collector stores once.
ACK_WRITE_INTERVAL_S = 30.0
# The collector answers once the changes are in its spool (one write): only a hung one takes this long.
REQUEST_TIMEOUT_S = 10.0
# A wait for the next change ends at this at the latest, to look again (a watch can miss nothing, but
# a store that was away may have been changed by another replica meanwhile).
IDLE_WAIT_S = 60.0
# Answers that mean "this change can never be taken as it is": retrying would not help.
_REFUSED = (400, 413)


def changes_url(url: str) -> str:
    """The /v1/changes URL a --collector names: http://HOST:PORT (the collector's OTLP/HTTP port), or the full
    URL ending in /v1/changes; ValueError in one line otherwise."""
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise ValueError(f"invalid port in collector URL {url!r}") from None
    if parts.scheme != "http" or not parts.hostname or (parts.path not in ("", "/")
                                                        and not parts.path.endswith("/v1/changes")):
        raise ValueError(f"collector URL must be http://HOST:PORT (its OTLP/HTTP port, 4318) or end in /v1/changes, "
                         f"got {url!r}")
    path = parts.path if parts.path.endswith("/v1/changes") else "/v1/changes"
    return urlunsplit(("http", parts.netloc, path, parts.query, ""))


def service_of_change(kind: str, name: str, doc: dict[str, Any] | None) -> str:
    """The service a resource is about: a Mode's or a Guard's own, the ones its hosts name (Istio's rules,
    comma-separated when several), a LocalRateLimit's, the app label a selector picks; '' for the mesh or no
    selector."""
    spec = (doc or {}).get("spec") or {}
    if kind in ("Mode", "Guard"):
        return name
    if kind == "LocalRateLimit":
        return spec.get("service") or name
    if kind in ("PeerAuthentication", "AuthorizationPolicy"):
        return ((spec.get("selector") or {}).get("matchLabels") or {}).get("app") or ""
    if kind == "VirtualService":
        hosts = spec.get("hosts") or []
    elif kind == "DestinationRule":
        hosts = [spec.get("host")]
    else:
        return ""
    namespace = name.split("/", 1)[0] if "/" in name else "default"
    return ",".join(sorted({service_of(h, namespace)[0] for h in hosts if isinstance(h, str) and h}))


def mesh_change(entry: AuditEntry, control_id: str) -> MeshChange:
    """An audit entry as a row of mesh_changes. Its time in ns is computed the same on every replica, from the
    same stored float: a change's key is the same whoever ships it."""
    from_mode = to_mode = ""
    if entry.kind == "Mode":
        from_mode, to_mode = _mode(entry.before), _mode(entry.after)
    return MeshChange(
        time=round(entry.time * 1e9), revision=entry.revision, who=entry.who, kind=entry.kind, name=entry.name,
        service=service_of_change(entry.kind, entry.name, entry.after if entry.after is not None else entry.before),
        action=entry.action, from_mode=from_mode, to_mode=to_mode, before=entry.before, after=entry.after,
        reason=entry.reason, control_id=control_id)


def _mode(doc: dict[str, Any] | None) -> str:
    """The mode a Mode document puts in force; without one a service is observed (control/api.py, the CLI)."""
    return ((doc or {}).get("spec") or {}).get("mode") or "observe"


class ChangeShipper:
    """Ships the store's audit entries to one collector, in revision order, until stopped."""

    def __init__(self, store: Store, collector: str, control_id: str) -> None:
        # per process: where to, as whom
        self.store = store
        self.url = changes_url(collector)
        self.control_id = control_id
        self.compress = not is_loopback(urlsplit(self.url).hostname or "")
        """Whether bodies above GZIP_ABOVE are gzipped: unless the collector is on loopback, as sidecars do."""
        # where shipping stands: the last revision the collector acknowledged (None until read from the store),
        # the entries read after it and not acknowledged yet (the last revision read: `_through`), and what
        # of this is written to the store
        self.shipped: int | None = None
        self._pending: list[AuditEntry] = []
        self._through = 0
        self._written = 0
        self._written_at = float("-inf")
        # one change at a time for this many, after a batch was refused, to find the one refused
        self._one_by_one = 0
        # failures: backoff, and whether the collector's outage (or the store's) was said
        self._failing = False
        self._store_failing = False
        self._backoff = RETRY_MIN_S
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"<ChangeShipper {self.url} shipped={self.shipped} pending={len(self._pending)} failing={self._failing}>"

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop shipping (a request in flight is abandoned: shipped again next time) and write where it stands."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self._write_position(force=True)
        except StoreUnavailable as e:
            log.warning("cannot record where shipping changes stands collector=%s revision=%s error=%s",
                        self.url, self.shipped, e)
        if self._session is not None:
            await self._session.close()

    # -- the task ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                delay = await self._step()
            except StoreUnavailable as e:
                if not self._store_failing:
                    log.warning("store unavailable, changes wait collector=%s error=%s", self.url, e)
                self._store_failing = True
                delay = self._next_backoff()
            except Exception:  # our bug: say it loudly, and keep shipping rather than stop silently
                log.exception("shipping changes failed, carrying on collector=%s", self.url)
                delay = RETRY_MAX_S
            if delay and not self._stopping:
                await asyncio.sleep(delay)

    async def _step(self) -> float:
        """Ship what is pending, else read what is next, else wait for the next change; seconds to pause after."""
        if self.shipped is None:
            self.shipped = self._written = await self.store.acknowledged(self.url)
        if not self._pending:
            await self._write_position()  # when due: also during a long catch-up
            seen = await self.store.revision()  # before reading: a change after the read passes it, and wakes the wait
            self._pending = await self.store.changes_after(self.shipped, SHIP_BATCH)
            if self._store_failing:
                log.info("store back, shipping changes collector=%s", self.url)
                self._store_failing = False
            if not self._pending:
                if not self._stopping:
                    await self.store.wait(seen, self._idle_for())
                return 0.0
            self._through = self._pending[-1].revision
        return await self._ship()

    async def _ship(self) -> float:
        items = self._cut()
        body = b'{"changes":[' + b",".join(items) + b"]}"
        status, retry_after, text = await self._post(body)
        batch = self._pending[:len(items)]
        if status == 200:
            self._done(len(items))
            log.debug("changes shipped collector=%s through=%d changes=%d", self.url, batch[-1].revision, len(items))
            if self._failing:
                log.info("collector accepting changes again collector=%s shipped=%s", self.url, self.shipped)
            self._failing = False
            self._backoff = RETRY_MIN_S
            return 0.0
        if status in _REFUSED:
            if len(items) > 1:  # which one: send them alone
                self._one_by_one = len(items)
                return 0.0
            e = batch[0]
            log.error("collector refused a change, passing over it collector=%s revision=%d kind=%s name=%s "
                      "status=%d error=%s", self.url, e.revision, e.kind, e.name, status, _said(text))
            self._done(1)
            return 0.0
        if not self._failing:
            hint = " (a collector older than /v1/changes?)" if status in (404, 405) else ""
            log.warning("collector unavailable, changes wait collector=%s status=%s error=%s%s from_revision=%d",
                        self.url, status or "none", _said(text), hint, batch[0].revision)
        self._failing = True
        return retry_after if retry_after is not None else self._next_backoff()

    def _cut(self) -> list[bytes]:
        """The head of what is pending as JSON items: SHIP_BATCH of them (one after a refusal), SHIP_BYTES at most
        unless a single one is larger."""
        items: list[bytes] = []
        size = 0
        for entry in self._pending[:1 if self._one_by_one else SHIP_BATCH]:
            item = json.dumps(mesh_change(entry, self.control_id).as_json(), separators=(",", ":")).encode()
            if items and size + len(item) > SHIP_BYTES:
                break
            items.append(item)
            size += len(item)
        return items

    def _done(self, n: int) -> None:
        """The first `n` pending entries are the collector's: move past them."""
        del self._pending[:n]
        self._one_by_one = max(0, self._one_by_one - n)
        # Entries of one revision may be split over requests: stand before the first not yet taken.
        self.shipped = self._pending[0].revision - 1 if self._pending else self._through

    def _next_backoff(self) -> float:
        delay, self._backoff = self._backoff, min(RETRY_MAX_S, self._backoff * 2)
        return delay

    def _idle_for(self) -> float:
        """How long to wait for a change: until where shipping stands is due to be written, if it is not."""
        if self.shipped is not None and self.shipped > self._written:
            return max(0.1, self._written_at + ACK_WRITE_INTERVAL_S - time.monotonic())
        return IDLE_WAIT_S

    async def _write_position(self, force: bool = False) -> None:
        if self.shipped is None or self.shipped <= self._written:
            return
        if not force and time.monotonic() - self._written_at < ACK_WRITE_INTERVAL_S:
            return
        await self.store.acknowledge(self.url, self.shipped)
        self._written, self._written_at = self.shipped, time.monotonic()

    async def _post(self, body: bytes) -> tuple[int, float | None, str]:
        """(status, Retry-After in seconds or None, body text); status 0 when there was no answer."""
        headers = {"Content-Type": "application/json"}
        if self.compress and len(body) > GZIP_ABOVE:
            gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip container
            body = gz.compress(body) + gz.flush()
            headers["Content-Encoding"] = "gzip"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                text = await resp.text(errors="replace")
                return resp.status, parse_retry_after(resp.headers.get("Retry-After")), text
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return 0, None, failure_reason(e)


def _said(text: str) -> str:
    """What the collector said, for the log: its {"error": ...} line, else the start of its answer."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else text.strip()[:200]

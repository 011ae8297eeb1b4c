"""The control plane's store on etcd v3: several control-plane replicas over one cluster.

`etcd://HOST:PORT[,HOST:PORT...]` (aetcd, asyncio over etcd's gRPC API). Keys:

    /meshlens/resources/KIND/NAME    the document (JSON)
    /meshlens/audit/ID               one audit entry: who, when, action, before, after, reason
    /meshlens/acknowledged/CONSUMER  the last revision a consumer of the audit trail took (control/changes.py)

A change is one etcd transaction: it compares every resource it writes with the
revision it read (a replica that changed one meanwhile makes it start again), then
writes the resources and their audit entries together; the change's revision is etcd's
(cluster-wide, monotonic), and an audit entry's revision is the revision it was created
at. So every replica sees the same revisions, and `wait` is an etcd watch from the
revision a sidecar has: a change made through any replica wakes the long polls of all.
A member that does not answer is left for the next endpoint given, in turn.

Revisions are etcd's own: a write to the same cluster outside /meshlens/ moves them too,
which costs sidecars an identical snapshot, never a missed one (use a cluster of its own).
So does writing where the audit trail's shipping stands (`acknowledge`), which is why
control/changes.py writes it seldom.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import quote

from meshlens.policy.resources import Resource
from meshlens.control.store import AuditEntry, Change, Stale, Store, StoreUnavailable, StoreURLError

__all__ = ["EtcdStore"]

PREFIX = b"/meshlens/"
_RESOURCES = PREFIX + b"resources/"
_AUDIT = PREFIX + b"audit/"
_ACKNOWLEDGED = PREFIX + b"acknowledged/"
# Tries of a change whose resources another replica changed between our read and our write.
MAX_CONFLICT_RETRIES = 10
# Reads in one transaction: etcd's --max-txn-ops is 128 by default.
_READS_A_TXN = 100
# One request's deadline: etcd elects a new leader within ~1 s of losing one (election timeout 1 s).
REQUEST_TIMEOUT_S = 5


class EtcdStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        endpoints = []
        for part in url[len("etcd://"):].rstrip("/").split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise StoreURLError(f"etcd store URL must be etcd://HOST:PORT[,HOST:PORT...], got {url!r}")
            endpoints.append((host.strip("[]"), int(port)))
        self.endpoints = endpoints
        self._client: Any = None
        self._at = 0  # the endpoint in use
        self._waiters: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<EtcdStore {self.url}>"

    # -- connecting, and moving to the next member ---------------------------------------------------

    async def open(self) -> None:
        await self._call(lambda c: c.get(PREFIX + b"probe"))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _call(self, op: Any) -> Any:
        """`op(client)` against the member in use, then each next one, until one answers."""
        import aetcd

        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            if self._client is None:
                host, port = self.endpoints[self._at]
                self._client = aetcd.Client(host, port, timeout=REQUEST_TIMEOUT_S)
            try:
                return await op(self._client)
            except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, aetcd.InternalError) as e:
                last = e
                await self.close()
                self._at = (self._at + 1) % len(self.endpoints)
        raise StoreUnavailable(f"no etcd member answers at {self.url} ({type(last).__name__}: {last})")

    # -- reads ---------------------------------------------------------------------------------------

    async def revision(self) -> int:
        got = await self._call(lambda c: c.get_prefix(PREFIX + b"-", keys_only=True))  # nothing: just the header
        return got.header.revision

    async def get(self, kind: str, name: str) -> Resource | None:
        got = await self._call(lambda c: c.get(_key(kind, name)))
        return None if got is None else Resource(kind, name, json.loads(got.value), got.mod_revision)

    async def list(self, kind: str | None = None) -> list[Resource]:
        return (await self._range(kind))[1]

    async def everything(self) -> tuple[int, list[Resource]]:
        return await self._range(None)

    async def _range(self, kind: str | None) -> tuple[int, list[Resource]]:
        prefix = _RESOURCES + (kind.encode() + b"/" if kind else b"")
        got = await self._call(lambda c: c.get_prefix(prefix, sort_target="key"))
        out = []
        for kv in got:
            k, n = kv.key[len(_RESOURCES):].decode().split("/", 1)
            out.append(Resource(k, n, json.loads(kv.value), kv.mod_revision))
        out.sort(key=lambda r: (r.kind, r.name))
        return got.header.revision, out

    async def history(self, kind: str | None = None, name: str | None = None, limit: int = 100,
                      service: str | None = None) -> list[AuditEntry]:
        entries = []
        for e in await self._audit():
            if kind is not None and e.kind != kind or name is not None and e.name != name:
                continue
            if service is not None and e.name != service and not e.name.endswith("/" + service):
                continue
            entries.append(e)
        return entries[-limit:]

    async def changes_after(self, revision: int, limit: int) -> list[AuditEntry]:
        # The keys first (their create revisions, not the documents), then the values of those taken only:
        # this runs after every change, and the trail only grows.
        keys = await self._call(lambda c: c.get_prefix(_AUDIT, keys_only=True))
        later = sorted((kv.create_revision, kv.key) for kv in keys.kvs if kv.create_revision > revision)
        end = min(limit, len(later))
        while 0 < end < len(later) and later[end][0] == later[end - 1][0]:
            end += 1  # the rest of the last revision: an apply's resources share one
        entries = []
        for i in range(0, end, _READS_A_TXN):
            chunk = [key for _, key in later[i:min(end, i + _READS_A_TXN)]]
            _, responses = await self._call(lambda c: c.transaction(
                compare=[], success=[c.transactions.get(key) for key in chunk], failure=[]))
            entries += [_entry(meta.create_revision, value) for kvs in responses for value, meta in kvs]
        entries.sort(key=lambda x: (x.revision, x.kind, x.name))
        return entries

    async def _audit(self) -> list[AuditEntry]:
        """Every audit entry, by (revision, kind, name). Their keys are random: etcd cannot range them by revision."""
        got = await self._call(lambda c: c.get_prefix(_AUDIT))
        entries = [_entry(kv.create_revision, kv.value) for kv in got]
        entries.sort(key=lambda x: (x.revision, x.kind, x.name))
        return entries

    async def acknowledged(self, consumer: str) -> int:
        got = await self._call(lambda c: c.get(_ACKNOWLEDGED + quote(consumer, safe="").encode()))
        return 0 if got is None else int(got.value)

    async def acknowledge(self, consumer: str, revision: int) -> None:
        key = _ACKNOWLEDGED + quote(consumer, safe="").encode()

        async def attempt(c: Any) -> bool:
            old = await c.get(key)
            if old is not None and int(old.value) >= revision:
                return True  # another replica got as far already
            tx = c.transactions
            ok, _ = await c.transaction(
                compare=[tx.mod(key) == old.mod_revision if old is not None else tx.version(key) == 0],
                success=[tx.put(key, str(revision).encode())], failure=[])
            return ok

        for _ in range(MAX_CONFLICT_RETRIES):
            if await self._call(attempt):
                return
        raise StoreUnavailable(f"where {consumer} stands kept changing under this write ({MAX_CONFLICT_RETRIES} tries)")

    # -- changes ------------------------------------------------------------------------------------

    async def put(self, resources: list[Resource], change: Change,
                  expect: dict[tuple[str, str], int] | None = None) -> list[tuple[Resource, str]]:
        for _ in range(MAX_CONFLICT_RETRIES):
            done = await self._call(lambda c: self._try_put(c, resources, change, expect or {}))
            if done is not None:
                return done
        raise StoreUnavailable(f"the resources kept changing under this change ({MAX_CONFLICT_RETRIES} tries)")

    async def _try_put(self, c: Any, resources: list[Resource], change: Change,
                       expect: dict[tuple[str, str], int]) -> list[tuple[Resource, str]] | None:
        tx = c.transactions
        compare, ops, plan = [], [], []
        for (kind, name), revision in expect.items():
            key = _key(kind, name)
            now = await c.get(key)
            if now is None or now.mod_revision != revision:
                raise Stale(f"{kind} {name} changed since revision {revision}")
            compare.append(tx.mod(key) == revision)  # and still so when the transaction runs
        for res in resources:
            key = _key(res.kind, res.name)
            old = await c.get(key)
            text = _text(res.doc)
            if old is not None and old.value.decode() == text:
                plan.append((res, "unchanged", old.mod_revision))
                compare.append(tx.mod(key) == old.mod_revision)
                continue
            action = "configured" if old is not None else "created"
            compare.append(tx.mod(key) == old.mod_revision if old is not None else tx.version(key) == 0)
            ops.append(tx.put(key, text.encode()))
            ops.append(tx.put(_AUDIT + uuid.uuid4().hex.encode(), _audit(change, res.kind, res.name, action,
                                                                          old.value.decode() if old else None, text)))
            plan.append((res, action, 0))
        if not ops:
            return [(Resource(r.kind, r.name, r.doc, rev, r.warnings), a) for r, a, rev in plan]
        ok, responses = await c.transaction(compare=compare, success=ops, failure=[])
        if not ok:
            return None
        revision = responses[0].response_put.header.revision
        return [(Resource(r.kind, r.name, r.doc, rev or revision, r.warnings), a) for r, a, rev in plan]

    async def delete(self, kind: str, name: str, change: Change) -> int | None:
        key = _key(kind, name)
        for _ in range(MAX_CONFLICT_RETRIES):
            async def attempt(c: Any) -> int | None | bool:
                old = await c.get(key)
                if old is None:
                    return None
                tx = c.transactions
                ok, responses = await c.transaction(
                    compare=[tx.mod(key) == old.mod_revision],
                    success=[tx.delete(key), tx.put(_AUDIT + uuid.uuid4().hex.encode(),
                                                    _audit(change, kind, name, "deleted", old.value.decode(), None))],
                    failure=[])
                return responses[1].response_put.header.revision if ok else False

            done = await self._call(attempt)
            if done is not False:
                return done  # type: ignore[return-value]
        raise StoreUnavailable(f"{kind} {name} kept changing under this delete ({MAX_CONFLICT_RETRIES} tries)")

    # -- watching -----------------------------------------------------------------------------------

    async def wait(self, after: int, timeout: float) -> int:
        now = await self.revision()
        if now > after:
            return now
        import aetcd

        task = asyncio.ensure_future(self._call(lambda c: c.watch_prefix_once(PREFIX, timeout=max(1, int(timeout)),
                                                                              start_revision=after + 1)))
        self._waiters.add(task)
        try:
            await task
        except (aetcd.WatchTimeoutError, asyncio.CancelledError, StoreUnavailable):
            pass
        finally:
            self._waiters.discard(task)
        return await self.revision()

    def release_waiters(self) -> None:
        for task in list(self._waiters):
            task.cancel()


def _entry(revision: int, value: bytes) -> AuditEntry:
    e = json.loads(value)
    return AuditEntry(revision, e["time"], e["who"], e["kind"], e["name"], e["action"], e["before"], e["after"],
                      e["reason"])


def _key(kind: str, name: str) -> bytes:
    return _RESOURCES + f"{kind}/{name}".encode()


def _text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _audit(change: Change, kind: str, name: str, action: str, before: str | None, after: str | None) -> bytes:
    return json.dumps({"time": time.time(), "who": change.who, "kind": kind, "name": name, "action": action,
                       "before": json.loads(before) if before else None, "after": json.loads(after) if after else None,
                       "reason": change.reason}).encode()

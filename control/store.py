"""The control plane's store: resources with a monotonic revision, every change audited.

One interface, chosen by URL (`open_store`):

    sqlite:PATH                      the default (stdlib sqlite3, WAL): one control-plane process per file
    etcd://HOST:PORT[,HOST:PORT...]  etcd v3 (control/etcd.py): several control-plane replicas share one
                                     mesh and learn of each other's changes by watching it

A change (`put`, `delete`) is one transaction: the resource's new state and its audit
entry (who, when, what, from -> to, the reason given) are written together, under the
revision the change gets; a `put` of what is already stored changes nothing and writes
no entry. Revisions only grow, across restarts. `wait` lets a long poll sleep until the
revision passes the one a watcher has (in this process: the store notifies its waiters).

The audit trail is also shipped elsewhere (control/changes.py: to a collector's
mesh_changes): `changes_after` reads it in revision order, and `acknowledged` /
`acknowledge` keep, per destination, the last revision it took, in the store itself,
so that shipping resumes where it stopped after a restart, from any replica.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlens.policy.resources import Resource

__all__ = ["AuditEntry", "Change", "Stale", "SqliteStore", "Store", "StoreURLError", "StoreUnavailable", "default_store_url",
           "open_store"]


class StoreURLError(ValueError):
    """A --store URL that names no store we can open."""


@dataclass(frozen=True)
class Change:
    """Who asks for a change, and why."""

    who: str
    reason: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """One change, as the history shows it."""

    revision: int
    time: float
    """Unix seconds."""
    who: str
    kind: str
    name: str
    action: str
    """created, configured or deleted."""
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "time": self.time, "who": self.who, "kind": self.kind, "name": self.name,
                "action": self.action, "before": self.before, "after": self.after, "reason": self.reason}


def default_store_url() -> str:
    from meshlens.config import data_home

    return f"sqlite:{data_home() / 'control' / 'control.db'}"


def open_store(url: str) -> Store:
    """The store a URL names (not yet connected: `await store.open()`)."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if not path:
            raise StoreURLError("sqlite store URL needs a path: sqlite:PATH")
        return SqliteStore(Path(path))
    if url.startswith("etcd://"):
        from meshlens.control.etcd import EtcdStore

        return EtcdStore(url)
    raise StoreURLError(f"unknown store URL {url!r}: expected sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]")


class Store:
    """What the control plane keeps. Every method may raise StoreUnavailable (the store cannot be reached)."""

    url = ""

    async def open(self) -> None:
        """Connect (and create what is missing); StoreURLError or StoreUnavailable in one line."""

    async def close(self) -> None: ...

    async def revision(self) -> int:
        raise NotImplementedError

    async def get(self, kind: str, name: str) -> Resource | None:
        raise NotImplementedError

    async def list(self, kind: str | None = None) -> list[Resource]:
        raise NotImplementedError

    async def everything(self) -> tuple[int, list[Resource]]:
        """Every resource and the revision they are at, read at one moment."""
        raise NotImplementedError

    async def everything(self) -> tuple[int, list[Resource]]:
        return self._revision(), await self.list()  # one thread, no await between the two: one moment

    async def history(self, kind: str | None = None, name: str | None = None, limit: int = 100,
                      service: str | None = None) -> list[AuditEntry]:
        raise NotImplementedError

    async def changes_after(self, revision: int, limit: int) -> list[AuditEntry]:
        """The audit entries after `revision`, oldest first, ordered by (revision, kind, name): `limit` of them,
        more when the last revision has more entries (one revision's are never split), fewer when there are no more."""
        raise NotImplementedError

    async def acknowledged(self, consumer: str) -> int:
        """The last revision `consumer` (a collector's URL) acknowledged: it has every entry up to it; 0 if none."""
        raise NotImplementedError

    async def acknowledge(self, consumer: str, revision: int) -> None:
        """Record that `consumer` has every entry up to `revision`; one lower than recorded changes nothing (two
        replicas may both ship)."""
        raise NotImplementedError

    async def put(self, resources: list[Resource], change: Change,
                  expect: dict[tuple[str, str], int] | None = None) -> list[tuple[Resource, str]]:
        """Store every resource, all or none: each with its action (created, configured, unchanged).

        `expect`: (kind, name) -> the revision it was read at; if one is stored at another revision now
        (or gone), nothing is stored and Stale is raised: a compare-and-set for a decision made on a read."""
        raise NotImplementedError

    async def delete(self, kind: str, name: str, change: Change) -> int | None:
        raise NotImplementedError

    async def wait(self, after: int, timeout: float) -> int:
        raise NotImplementedError

    def release_waiters(self) -> None: ...


class Stale(Exception):
    """A resource a change was decided on was changed meanwhile (Store.put's `expect`)."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (all etcd members down, the disk gone): 503 to the caller."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, revision INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, who TEXT NOT NULL,
    kind TEXT NOT NULL, name TEXT NOT NULL, action TEXT NOT NULL,
    before TEXT, after TEXT, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS changes_by_name ON changes (kind, name, revision);
CREATE TABLE IF NOT EXISTS acknowledged (consumer TEXT PRIMARY KEY, revision INTEGER NOT NULL);
"""


class SqliteStore(Store):
    """Resources and their history in one SQLite file (WAL: readers never wait for the writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:{path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a change acknowledged is a change kept
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreURLError(f"cannot open store {self.url}: {e}") from None
        self._waiters: set[asyncio.Future[int]] = set()

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"

    async def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------------------------

    async def revision(self) -> int:
        return self._revision()

    def _revision(self) -> int:
        row = self._db.execute("SELECT max(revision) FROM changes").fetchone()
        return row[0] or 0

    async def get(self, kind: str, name: str) -> Resource | None:
        row = self._db.execute("SELECT doc, revision FROM resources WHERE kind = ? AND name = ?", (kind, name)).fetchone()
        return Resource(kind, name, json.loads(row[0]), row[1]) if row else None

    async def list(self, kind: str | None = None) -> list[Resource]:
        if kind is None:
            rows = self._db.execute("SELECT kind, name, doc, revision FROM resources ORDER BY kind, name")
        else:
            rows = self._db.execute("SELECT kind, name, doc, revision FROM resources WHERE kind = ? ORDER BY name",
                                    (kind,))
        return [Resource(k, n, json.loads(d), r) for k, n, d, r in rows]

    async def history(self, kind: str | None = None, name: str | None = None, limit: int = 100,
                service: str | None = None) -> list[AuditEntry]:
        """The newest `limit` changes, oldest first: of one kind, one resource, or one service (resources named
        as it, in any namespace: its Mode, its VirtualService, ...)."""
        where: list[str] = []
        args: list[Any] = []
        if service is not None:
            where.append("(name = ? OR name LIKE ? ESCAPE '\\')")
            args += [service, "%/" + service.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if name is not None:
            where.append("name = ?")
            args.append(name)
        sql = ("SELECT revision, time, who, kind, name, action, before, after, reason FROM changes"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY revision DESC LIMIT ?")
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [AuditEntry(r, t, w, k, n, a, _json(b), _json(af), why) for r, t, w, k, n, a, b, af, why in reversed(rows)]

    async def changes_after(self, revision: int, limit: int) -> list[AuditEntry]:
        # Here every entry has a revision of its own: `limit` rows end on a whole revision.
        rows = self._db.execute("SELECT revision, time, who, kind, name, action, before, after, reason FROM changes"
                                " WHERE revision > ? ORDER BY revision LIMIT ?", (revision, limit)).fetchall()
        return [AuditEntry(r, t, w, k, n, a, _json(b), _json(af), why) for r, t, w, k, n, a, b, af, why in rows]

    async def acknowledged(self, consumer: str) -> int:
        row = self._db.execute("SELECT revision FROM acknowledged WHERE consumer = ?", (consumer,)).fetchone()
        return row[0] if row else 0

    async def acknowledge(self, consumer: str, revision: int) -> None:
        self._db.execute("INSERT INTO acknowledged (consumer, revision) VALUES (?, ?) ON CONFLICT (consumer)"
                         " DO UPDATE SET revision = max(revision, excluded.revision)", (consumer, revision))

    # -- changes -----------------------------------------------------------------------------------

    async def put(self, resources: list[Resource], change: Change,
                  expect: dict[tuple[str, str], int] | None = None) -> list[tuple[Resource, str]]:
        out: list[tuple[Resource, str]] = []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (kind, name), revision in (expect or {}).items():
                now = db.execute("SELECT revision FROM resources WHERE kind = ? AND name = ?", (kind, name)).fetchone()
                if now is None or now[0] != revision:
                    raise Stale(f"{kind} {name} changed since revision {revision}")
            for res in resources:
                old = db.execute("SELECT doc, revision FROM resources WHERE kind = ? AND name = ?",
                                 (res.kind, res.name)).fetchone()
                text = json.dumps(res.doc, sort_keys=True, separators=(",", ":"))
                if old is not None and old[0] == text:
                    out.append((Resource(res.kind, res.name, res.doc, old[1], res.warnings), "unchanged"))
                    continue
                action = "configured" if old is not None else "created"
                revision = db.execute(
                    "INSERT INTO changes (time, who, kind, name, action, before, after, reason)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), change.who, res.kind, res.name, action, old[0] if old else None, text,
                     change.reason)).lastrowid
                db.execute("INSERT OR REPLACE INTO resources (kind, name, doc, revision) VALUES (?, ?, ?, ?)",
                           (res.kind, res.name, text, revision))
                out.append((Resource(res.kind, res.name, res.doc, revision, res.warnings), action))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.release_waiters()
        return out

    async def delete(self, kind: str, name: str, change: Change) -> int | None:
        """The revision of the deletion, or None when there was nothing to delete."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute("SELECT doc FROM resources WHERE kind = ? AND name = ?", (kind, name)).fetchone()
            if old is None:
                db.execute("ROLLBACK")
                return None
            revision = db.execute(
                "INSERT INTO changes (time, who, kind, name, action, before, after, reason)"
                " VALUES (?, ?, ?, ?, 'deleted', ?, NULL, ?)",
                (time.time(), change.who, kind, name, old[0], change.reason)).lastrowid
            db.execute("DELETE FROM resources WHERE kind = ? AND name = ?", (kind, name))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.release_waiters()
        return revision

    # -- watching ----------------------------------------------------------------------------------

    async def wait(self, after: int, timeout: float) -> int:
        """The revision once it is past `after`, or the current one when `timeout` seconds pass first."""
        now = self._revision()
        if now > after:
            return now
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return self._revision()
        finally:
            self._waiters.discard(fut)

    def release_waiters(self) -> None:
        """Answer every waiter now with the current revision: after a change, and when the process stops."""
        revision = self._revision()
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(revision)


def _json(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text is not None else None

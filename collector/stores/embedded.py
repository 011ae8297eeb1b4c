"""`chdb:PATH`: ClickHouse inside this process (chdb), data in a directory.

Only one process may open a directory: the collector. Others reach the data
through the collector's query endpoint (an `http://` store).
A chdb query blocks its thread (releasing the GIL); async callers run these methods in an executor.

chdb 4.4 runs one statement at a time per connection (a `SELECT 1` waited 3.2 s behind a
long count on the same session) but statements of different connections on one path at
once, in one engine (measured: 5 ms beside it, and an INSERT on one connection is seen by
the others). So writes and DDL share one connection under a lock, and `raw_read` takes a
connection of its own from a pool (opening one costs ~2 ms and under 1 MB).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from meshlens.collector.stores.base import Store, StoreError, first_line, insert_columns_sql, quote_ident
from meshlens.collector.stores.insert_ledger import InsertLedger, Replay
from meshlens.config import data_home

if TYPE_CHECKING:
    from chdb.session import Session

log = logging.getLogger("meshlens.collector")


def default_data_dir() -> Path:
    return data_home() / "chdb"


class EmbeddedStore(Store):
    def __init__(self, path: str | os.PathLike[str], database: str = "meshlens") -> None:
        from chdb import session  # imported here: ~1 s and ~200 MB, only where used

        self.path = Path(path)
        self.url = f"chdb:{self.path}"
        self.database = database
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".meshlens-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"cannot use data directory {self.path}: {e.strerror or e}") from None
        holder = _other_holder(self.path)
        if holder is not None:
            raise StoreError(f"the embedded store at {self.path} is open in another process (pid {holder}, a "
                             f"collector?): read it through that collector's query endpoint, e.g. "
                             f"--store http://127.0.0.1:8123/")
        try:
            self._session = session.Session(str(self.path))
        except Exception as e:  # chdb raises its own error types
            raise StoreError(f"cannot open embedded store at {self.path}: {first_line(e)}") from None
        # chdb sessions are safe from several threads, but a statement and the
        # insert that depends on it must not interleave with a DROP elsewhere;
        # one lock keeps the embedded store's writes simple and predictable.
        self._lock = threading.Lock()
        # Idle read connections; the pool grows to the peak number of concurrent reads.
        self._readers: list[Session] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        # What was being inserted when the last run died (stores/insert_ledger.py), resolved
        # against the parts at the first insert, once the schema is in place.
        self._ledger = InsertLedger(self.path)
        self._replays: dict[str, Replay] | None = None

    def raw_query(self, sql: str, fmt: str = "TabSeparated") -> bytes:
        """Run any statement and return its output in `fmt` (the query endpoint's entry)."""
        with self._lock:
            try:
                res = self._session.query(sql, fmt)
            except Exception as e:
                raise StoreError(first_line(e)) from None
        return res.bytes() if res is not None else b""

    def raw_read(self, sql: str, fmt: str = "TabSeparated") -> bytes:
        """Run a statement on a connection of its own: it waits neither for inserts nor for other reads.

        Nothing here makes it read-only: the caller (the query endpoint) does.
        """
        conn = self._reader()
        try:
            res = conn.query(sql, fmt)
        except Exception as e:
            raise StoreError(first_line(e)) from None
        finally:
            self._release(conn)
        return res.bytes() if res is not None else b""

    def _reader(self) -> Session:
        from chdb import session

        with self._readers_lock:
            if self._closed:
                raise StoreError(f"embedded store at {self.path} is closed")
            if self._readers:
                return self._readers.pop()
        try:
            return session.Session(str(self.path))
        except Exception as e:
            raise StoreError(f"cannot open a read connection to {self.path}: {first_line(e)}") from None

    def _release(self, conn: Session) -> None:
        with self._readers_lock:
            if not self._closed:
                self._readers.append(conn)
                return
        conn.close()

    def command(self, sql: str, settings: dict[str, Any] | None = None) -> None:
        self.raw_query(sql + _settings_clause(settings), "TabSeparated")

    def query_table(self, sql: str) -> tuple[list[str], list[tuple]]:
        doc = json.loads(self.raw_query(sql, "JSONCompact") or b'{"meta":[],"data":[]}')
        return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]

    def query_arrow(self, sql: str) -> pa.Table:
        data = self.raw_query(sql, "ArrowStream")
        return pa.ipc.open_stream(data).read_all()

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        """Insert under `token`, stored once even when the last run died inside the insert of the same token.

        The ledger (stores/insert_ledger.py) names each insert before it runs; a replay of one
        that never returned skips the partitions it landed in and takes a fresh token for the rest.
        """
        batch = data  # noqa: F841 - chdb's Python() table function finds it by name
        source, used, landed = "Python(batch)", token, set()
        with self._lock:
            try:
                if self._replays is None:
                    self._replays = self._unfinished_inserts()
                replay = self._replays.get(token)
                db, name = _split_table(table, self.database)
                if replay is not None:
                    used, landed = replay.fresh_token(token), replay.landed
                    source, empty = self._rows_outside(db, name, data, landed)
                    if empty:
                        self._forget(token)
                        return
                self._begin(token, used, table, self._max_block(db, name), landed)
                sql = f"{insert_columns_sql(table, data)} SELECT * FROM {source}"
                self._session.query(sql + _settings_clause({"insert_deduplication_token": used}))
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(first_line(e)) from None
            self._forget(token)

    def _unfinished_inserts(self) -> dict[str, Replay]:
        """The insert the last run began and never finished, with the partitions its parts landed in."""
        pending = self._ledger.unfinished()
        if pending is None:
            return {}
        db, name = _split_table(pending.table, self.database)
        landed = {row[0] for row in self._rows(
            f"SELECT DISTINCT partition_id FROM system.parts WHERE database = {_literal(db)} "
            f"AND table = {_literal(name)} AND active AND max_block_number > {pending.after_block}")}
        log.info("resolving an insert cut short token=%s table=%s landed_partitions=%s",
                 pending.token, pending.table, ",".join(sorted(landed | set(pending.landed))) or "none")
        return {pending.token: Replay(landed | set(pending.landed))}

    def _rows_outside(self, db: str, name: str, data: pa.Table, landed: set[str]) -> tuple[str, bool]:
        """The SELECT source of `data`'s rows whose partition is not in `landed`, and whether there are none."""
        if not landed:
            return "Python(batch)", False
        key = self._rows(f"SELECT partition_key FROM system.tables WHERE database = {_literal(db)} "
                         f"AND name = {_literal(name)}")[0][0]
        if not key:  # one partition, 'all'
            return "Python(batch)", "all" in landed
        # The partition is computed on the table's own types, as the insert computes it.
        types = dict(self._rows(f"SELECT name, type FROM system.columns WHERE database = {_literal(db)} "
                                f"AND table = {_literal(name)}"))
        cast = ", ".join(f"CAST(`{c}` AS {types[c]}) AS `{c}`" for c in data.column_names)
        ids = ", ".join(_literal(p) for p in sorted(landed))
        return f"(SELECT {cast} FROM Python(batch)) WHERE partitionId({key}) NOT IN ({ids})", False

    def _max_block(self, db: str, name: str) -> int:
        rows = self._rows(f"SELECT max(max_block_number) FROM system.parts WHERE database = {_literal(db)} "
                          f"AND table = {_literal(name)} AND active")
        return int(rows[0][0]) if rows else 0

    def _rows(self, sql: str) -> list[list[Any]]:
        res = self._session.query(sql, "JSONCompact")
        return json.loads(res.bytes() or b'{"data":[]}')["data"]

    def _begin(self, token: str, used: str, table: str, after_block: int, landed: set[str]) -> None:
        try:
            self._ledger.begin(token, used, table, after_block, landed)
        except OSError as e:  # a full disk: the insert goes on, as it did before the ledger
            log.warning("cannot write the insert ledger path=%s error=%s", self._ledger.path, e.strerror or e)

    def _forget(self, token: str) -> None:
        assert self._replays is not None
        self._replays.pop(token, None)
        try:
            self._ledger.done(token)
        except OSError as e:
            log.warning("cannot write the insert ledger path=%s error=%s", self._ledger.path, e.strerror or e)

    def use_database(self) -> None:
        self.command(f"USE {quote_ident(self.database)}")

    def close(self) -> None:
        """Close the idle read connections now, busy ones when their statement returns, then the writer."""
        with self._readers_lock:
            self._closed, idle, self._readers = True, self._readers, []
        for conn in idle:
            conn.close()
        with self._lock:
            self._session.close()


def _other_holder(path: Path) -> int | None:
    """The pid of another process that has this data directory open, else None.

    ClickHouse holds an exclusive flock on `status` (which names its pid) while a directory is open;
    chdb, failing to take it, prints its own error and raises one that does not say why."""
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        text = os.read(fd, 256).decode("ascii", "replace")
    finally:
        os.close(fd)
    pid = next((int(w) for w in text.split() if w.isdigit()), 0)
    return pid if pid != os.getpid() else None


def _split_table(table: str, database: str) -> tuple[str, str]:
    """`db`.`name` (as stores are given tables) as its two names; the store's database when unqualified."""
    db, _, name = table.rpartition(".")
    return (db.strip("`") or database), name.strip("`")


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _settings_clause(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    parts = []
    for k, v in settings.items():
        val = str(v) if isinstance(v, (int, float)) else _literal(str(v))
        parts.append(f"{k} = {val}")
    return " SETTINGS " + ", ".join(parts)


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
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from meshlens.collector.stores.base import Store, StoreError, first_line, insert_columns_sql, quote_ident
from meshlens.config import data_home

if TYPE_CHECKING:
    from chdb.session import Session


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
        batch = data  # noqa: F841 - chdb's Python() table function finds it by name
        sql = f"{insert_columns_sql(table, data)} SELECT * FROM Python(batch)"
        sql += _settings_clause({"insert_deduplication_token": token})
        with self._lock:
            try:
                self._session.query(sql)
            except Exception as e:
                raise StoreError(first_line(e)) from None

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


def _settings_clause(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    parts = []
    for k, v in settings.items():
        val = str(v) if isinstance(v, (int, float)) else "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{k} = {val}")
    return " SETTINGS " + ", ".join(parts)


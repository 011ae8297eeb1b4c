"""`clickhouse://user:pass@host:9000/db`: a ClickHouse server over the native protocol.

clickhouse-driver with columnar inserts and LZ4 compression on the wire.
"""
from __future__ import annotations

import logging
import re
import socket
from typing import Any

import pyarrow as pa

from meshlens.collector.stores.base import (Store, StoreError, StoreUnavailable, first_line, in_sentence,
                                            insert_columns_sql, redact)

# clickhouse-driver logs every failed connect as a warning with its traceback; the failure
# reaches the caller as StoreUnavailable, which says it in one line (and the collector logs it once).
logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)

# The driver's network messages: "Code: 210. Connection refused (host:port)".
_DRIVER_PREFIX = re.compile(r"^Code: \d+\.\s*")
_HOST_SUFFIX = re.compile(r"\s*\([^()]*:\d+\)$")
# getaddrinfo's words for "no such host" (glibc, musl, macOS)
_UNRESOLVED = re.compile(r"name or service not known|name resolution|nodename nor servname|no address associated",
                         re.I)


class NativeStore(Store):
    def __init__(self, url: str, host: str, port: int, user: str, password: str,
                 database: str, cluster: str = "", secure: bool = False,
                 connect_timeout: float = 5.0) -> None:
        from clickhouse_driver import Client

        self.url = url
        self.database = database
        self.cluster = cluster
        self._client = Client(
            host=host, port=port, user=user or "default", password=password,
            database="default", secure=secure, compression="lz4",
            connect_timeout=connect_timeout, send_receive_timeout=300,
            settings={"use_numpy": False},
        )

    def _execute(self, sql: str, params: Any = None, **kw: Any) -> Any:
        from clickhouse_driver import errors

        try:
            return self._client.execute(sql, params, **kw)
        except errors.ServerException as e:
            raise StoreError(first_line(e.message)) from None
        except (errors.NetworkError, errors.SocketTimeoutError, socket.error, EOFError) as e:
            self._client.disconnect()
            raise StoreUnavailable(f"cannot reach the store at {redact(self.url)}: {_network_reason(e)}") from None
        except (errors.UnexpectedPacketFromServerError, errors.UnknownPacketFromServerError):
            self._client.disconnect()
            raise StoreError(f"the store at {redact(self.url)} does not speak ClickHouse's native protocol "
                             f"(is that its native port, 9000 by default?)") from None
        except errors.Error as e:
            raise StoreError(first_line(str(e))) from None

    def command(self, sql: str, settings: dict[str, Any] | None = None) -> None:
        self._execute(sql, settings=settings or {})

    def query_table(self, sql: str) -> tuple[list[str], list[tuple]]:
        rows, types = self._execute(sql, with_column_types=True)
        return [name for name, _ in types], [tuple(r) for r in rows]

    def query_arrow(self, sql: str) -> pa.Table:
        names, rows = self.query_table(sql)
        return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        columns = [_to_driver(col) for col in data.columns]
        settings = {"insert_deduplication_token": token}
        if self.cluster:
            # A token only protects a Distributed insert when it is forwarded synchronously.
            settings["distributed_foreground_insert"] = 1
        self._execute(f"{insert_columns_sql(table, data)} VALUES", columns,
                      columnar=True, settings=settings)

    def use_database(self) -> None:
        # The database is part of the native handshake: reconnect naming it.
        self._client.connection.database = self.database
        self._client.disconnect()

    def close(self) -> None:
        self._client.disconnect()


def _network_reason(e: BaseException) -> str:
    """The driver's network error in words: "connection refused", "timed out", …"""
    from clickhouse_driver import errors

    if isinstance(e, (errors.SocketTimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(e, EOFError):
        return "the server closed the connection"
    if isinstance(e, OSError):
        text = e.strerror or ""
    else:
        text = _HOST_SUFFIX.sub("", _DRIVER_PREFIX.sub("", getattr(e, "message", "") or first_line(e, "")))
    text = text.strip() or type(e).__name__
    if _UNRESOLVED.search(text):
        return "cannot resolve the host name"
    return in_sentence(text)


def _to_driver(col: pa.ChunkedArray) -> list:
    """Arrow column to the Python values clickhouse-driver writes: ints for times, dicts for maps."""
    return _convert(col.type, col)


def _convert(typ: pa.DataType, arr: Any) -> list:
    if pa.types.is_timestamp(typ):
        return arr.cast(pa.int64()).to_pylist()
    if pa.types.is_map(typ):
        return [dict(x) if x is not None else {} for x in arr.to_pylist()]
    if pa.types.is_list(typ) and pa.types.is_timestamp(typ.value_type):
        # Cast in Arrow: to_pylist() of ns timestamps needs pandas (a dev-only dependency).
        ints = arr.cast(pa.list_(pa.int64())).to_pylist()
        return [[v if v is not None else 0 for v in item or []] for item in ints]
    if pa.types.is_list(typ) and pa.types.is_map(typ.value_type):
        return [[dict(m) if m else {} for m in item or []] for item in arr.to_pylist()]
    return arr.to_pylist()


"""`http(s)://user:pass@host:8123/?database=db`: any ClickHouse HTTP interface.

A real server, or the collector's own query endpoint over the embedded store
(which is read-only: inserts go to the collector's ingest endpoints instead).
Statements are sent without a session database (a server refuses any
statement, even CREATE DATABASE, naming one that does not exist yet) until
`use_database()` says it exists; from then on reads resolve unqualified names in it.
"""
from __future__ import annotations

import csv
import http.client
import io
import json
import re
import socket
import ssl
from typing import Any
from urllib.parse import urlencode

import pyarrow as pa
import urllib3

from meshlens.collector.stores.base import (MIN_VERSION, Store, StoreError, StoreUnavailable, first_line,
                                   in_sentence, insert_columns_sql, parse_version, redact)

__all__ = ["HttpStore", "connection_reason"]

_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>:? ?")


class HttpStore(Store):
    def __init__(self, url: str, base: str, user: str, password: str, database: str,
                 cluster: str = "", timeout: float = 300.0, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.database = database
        self.cluster = cluster
        self._base = base.rstrip("/") + "/"
        self._headers = {"X-ClickHouse-User": user or "default"}
        if password:
            self._headers["X-ClickHouse-Key"] = password
        # One host, so one pool: its close() closes the sockets (PoolManager.clear() leaves that to GC).
        self._pool = urllib3.connection_from_url(
            self._base, maxsize=4, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=timeout),
        )
        self._arrow: bool | None = None
        self._read_params: dict[str, Any] = {}

    def _post(self, sql: str, body: bytes | None = None, params: dict[str, Any] | None = None) -> bytes:
        query = dict(params or {})
        if body is None:
            body, target = sql.encode(), self._base + "?" + urlencode(query)
        else:
            target = self._base + "?" + urlencode({"query": sql, **query})
        try:
            resp = self._pool.request("POST", target, body=body, headers=self._headers)
        except urllib3.exceptions.HTTPError as e:
            raise StoreUnavailable(f"cannot reach the store at {redact(self.url)}: {connection_reason(e)}") from None
        if resp.status != 200:
            text = resp.data.decode("utf-8", "replace").strip()
            if resp.status in (502, 503, 504):
                raise StoreUnavailable(f"the store at {redact(self.url)} answered {resp.status}: {first_line(text)}")
            if "X-ClickHouse-Exception-Code" not in resp.headers and not text.startswith("Code:"):
                raise StoreError(f"the store at {redact(self.url)} answered HTTP {resp.status}, not as ClickHouse "
                                 f"does (is it a ClickHouse HTTP interface?)")
            raise StoreError(first_line(text, f"HTTP {resp.status}"))
        return resp.data

    def _json(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            raise StoreError(f"the store at {redact(self.url)} answered with something other than ClickHouse "
                             f"JSON (is it a ClickHouse HTTP interface?)") from None

    def command(self, sql: str, settings: dict[str, Any] | None = None) -> None:
        self._post(sql, params=settings)

    def query_table(self, sql: str) -> tuple[list[str], list[tuple]]:
        # Older servers quote (U)Int64 in JSON by default (18.16 does, 26.9 not): ask for numbers.
        params = {"default_format": "JSONCompact", "output_format_json_quote_64bit_integers": 0,
                  **self._read_params}
        doc = self._json(self._post(sql, params=params) or b'{"meta":[],"data":[]}')
        return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]

    def query_arrow(self, sql: str) -> pa.Table:
        if not self._speaks_arrow():
            names, rows = self.query_table(sql)
            return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})
        data = self._post(sql, params={"default_format": "ArrowStream", **self._read_params})
        return pa.ipc.open_stream(data).read_all()

    def insert(self, table: str, data: pa.Table, token: str) -> None:
        params = {"insert_deduplication_token": token}
        if self.cluster:
            params["distributed_foreground_insert"] = 1
        if self._speaks_arrow():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, data.schema) as writer:
                writer.write_table(data)
            self._post(f"{insert_columns_sql(table, data)} FORMAT ArrowStream", sink.getvalue().to_pybytes(), params)
        else:
            # Servers older than MIN_VERSION may read no Arrow; plain columns go as TSV.
            # (Only reached by tooling that talks to such a server before refusing it.)
            del params["insert_deduplication_token"]
            self._post(f"{insert_columns_sql(table, data)} FORMAT TabSeparated", _tsv(data), params)

    def use_database(self) -> None:
        self._read_params = {"database": self.database}

    def server_version(self) -> str:
        doc = self._json(self._post("SELECT version() FORMAT JSONCompact"))
        try:
            return str(doc["data"][0][0])
        except (KeyError, IndexError, TypeError):
            raise StoreError(f"the store at {redact(self.url)} did not say its version "
                             f"(is it a ClickHouse HTTP interface?)") from None

    def _speaks_arrow(self) -> bool:
        """Whether the server reads and writes ArrowStream (servers older than MIN_VERSION may not)."""
        if self._arrow is None:
            self._arrow = parse_version(self.server_version())[:2] >= MIN_VERSION
        return self._arrow

    def close(self) -> None:
        self._pool.close()


def connection_reason(error: BaseException) -> str:
    """Why a connection failed, in words ("connection refused"), from the socket error under `error`.

    urllib3's messages start with the repr of its connection object; the OS error it wraps says it plainly."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted ({e.verify_message})"
        if isinstance(e, ssl.SSLError):
            return f"TLS failed ({e.reason or e.strerror or 'handshake'})"
        if isinstance(e, socket.gaierror):
            return "cannot resolve the host name"
        if isinstance(e, http.client.RemoteDisconnected):
            return "the server closed the connection without answering"
        if isinstance(e, urllib3.exceptions.ReadTimeoutError):
            return "no answer in time"
        if isinstance(e, TimeoutError):
            return "timed out"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(e, OSError) and e.strerror:
            return in_sentence(e.strerror)
        wrapped = e.args[1] if isinstance(e, urllib3.exceptions.ProtocolError) and len(e.args) > 1 else None
        e = wrapped if isinstance(wrapped, BaseException) and id(wrapped) not in seen else (e.__cause__ or e.__context__)
    return _REPR.sub("", first_line(error, type(error).__name__)) or type(error).__name__


def _tsv(data: pa.Table) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
    for row in zip(*(c.to_pylist() for c in data.columns)):
        writer.writerow(row)
    return out.getvalue().encode()


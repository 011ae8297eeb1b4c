"""The collector's query endpoint: ClickHouse's HTTP interface, read-only, over the embedded store.

    GET|POST /?query=...   a query in the URL, the body, or both (URL part + "\\n" + body)
    GET /, /ping, /replicas_status   "Ok.\\n"

clickhouse-connect, Grafana's ClickHouse datasource and curl use it as if it were
a server. What a request means and which statements may run is query_protocol.py;
this is the aiohttp shell around it.

Queries run at once, each on a chdb connection of its own (the store's `raw_read`), so a
long one delays neither short ones nor ingestion. Up to `max_concurrent_queries` run; one
more is refused as ClickHouse refuses past its `max_concurrent_queries` (code 202, HTTP 500).
A statement is tagged with the request's query id (its `log_comment`: chdb does not let us
set `query_id`); a client that goes away has its statement killed, as ClickHouse does with
`cancel_http_readonly_queries_on_client_close`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from meshlens.collector.config import MAX_CONCURRENT_QUERIES
from meshlens.collector.query_protocol import (
    DEFAULT_FORMAT,
    MAX_QUERY_BYTES,
    QueryError,
    QueryRequest,
    Statement,
    build_sql,
    compress,
    credentials,
    decompress,
    header_safe,
    inspect,
    kill_sql,
    parse_request,
    quote_string,
    write_refusal,
)
from meshlens.collector.stores.base import StoreError
from meshlens.collector.stores.embedded import EmbeddedStore

log = logging.getLogger(__name__)

# The same 1 MiB as MAX_QUERY_BYTES for the request line: aiohttp's 8 KiB default would cut GET /?query= short.
MAX_URL_BYTES = 1 << 20
# How often a cancelled statement is killed again until its thread returns: a KILL that
# lands before chdb has registered the statement finds nothing.
KILL_RETRY_SECONDS = 0.1
OK = "Ok.\n"


@dataclass(frozen=True)
class ServerFacts:
    """What the store reports about itself, read once; formats by lower-case name: (name, Content-Type)."""

    timezone: str
    formats: dict[str, tuple[str, str]]
    default_database: str


@dataclass
class Running:
    """A request's statements in a worker thread: the tag to kill them by, and how far they got."""

    query_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def _too_many(limit: int) -> QueryError:
    # ClickHouse's ProcessList::insert text; its exceptionCodeToHTTPStatus leaves 202 at 500.
    return QueryError(202, "TOO_MANY_SIMULTANEOUS_QUERIES", f"Too many simultaneous queries. Maximum: {limit} "
                      "(the collector's query_max_concurrent)")


class QueryEndpoint:
    """Request handlers over one store."""

    # -- per process: the store, credentials, limits and the worker threads
    def __init__(self, store: EmbeddedStore, user: str, password: str, max_concurrent_queries: int) -> None:
        self._store = store
        self._user, self._password = user, password
        self._limit = max_concurrent_queries
        # A thread per running query, one per cancellation of each, one for the server facts:
        # a statement never waits for a thread.
        self._executor = ThreadPoolExecutor(2 * max_concurrent_queries + 1, thread_name_prefix="meshlens-query")
        self._facts: ServerFacts | None = None
        self._facts_lock = asyncio.Lock()
        self._display_name = socket.gethostname()
        # -- per running query, by query id; an entry leaves when its thread returns, so a
        # query whose client went away counts against the limit until its kill lands.
        self._running: dict[str, Running] = {}

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text=OK)

    async def root(self, request: web.Request) -> web.Response:
        if request.method in ("GET", "HEAD") and "query" not in request.query and not request.can_read_body:
            return web.Response(text=OK)
        query_id = header_safe(request.query.get("query_id") or request.headers.get("X-ClickHouse-Query-Id", ""))
        headers = {"X-ClickHouse-Server-Display-Name": self._display_name,
                   "X-ClickHouse-Query-Id": query_id or str(uuid.uuid4())}
        try:
            return await self._query(request, headers)
        except QueryError as e:
            log.debug("query refused code=%d status=%d", e.code, e.status)
            return _error_response(e, headers)
        except Exception as e:  # a bug of ours: say so loudly, keep serving
            log.exception("query endpoint failed")
            return _error_response(QueryError(1001, "STD_EXCEPTION", f"{type(e).__name__}: {e}"), headers)

    async def _query(self, request: web.Request, headers: dict[str, str]) -> web.Response:
        started = time.monotonic_ns()
        self._authenticate(request)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise QueryError(229, "QUERY_IS_TOO_LARGE", f"body larger than {MAX_QUERY_BYTES} bytes") from None
        body = b""
        try:
            body = decompress(raw, request.headers.get("Content-Encoding", ""), MAX_QUERY_BYTES)
            req = parse_request(request.query, request.headers, body)
        except QueryError as e:  # an INSERT's binary data often fails first: name the real reason
            head = request.query.get("query", "") + "\n" + body[:256].decode("utf-8", "replace")
            raise write_refusal(head) or e from None
        facts = await self._server_facts()
        fmt = facts.formats.get((req.default_format or DEFAULT_FORMAT).lower())
        if fmt is None:
            raise QueryError(73, "UNKNOWN_FORMAT", f"Unknown format {req.default_format}")
        database = req.database or facts.default_database
        stmt, size, body = await self._run(headers["X-ClickHouse-Query-Id"], req, database, fmt[0])
        out_name, content_type = facts.formats.get((stmt.output_format or "").lower(), fmt)
        headers.update({
            "Content-Type": content_type,
            "X-ClickHouse-Format": out_name,
            "X-ClickHouse-Timezone": header_safe(req.settings.get("session_timezone", "")) or facts.timezone,
            "X-ClickHouse-Summary": json.dumps({
                "read_rows": "0", "read_bytes": "0", "written_rows": "0", "written_bytes": "0",
                "total_rows_to_read": "0", "result_rows": "0", "result_bytes": str(size),
                "elapsed_ns": str(time.monotonic_ns() - started)}),
        })
        if req.accept_encoding:
            headers["Content-Encoding"] = req.accept_encoding
        return web.Response(body=body, headers=headers)

    async def _run(self, query_id: str, req: QueryRequest, database: str, fmt: str) -> tuple[Statement, int, bytes]:
        """Take a slot or refuse as ClickHouse does; run in a worker thread; kill it if the client goes away."""
        if query_id in self._running:
            raise QueryError(216, "QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING", f"Query with id = {query_id} is already running")
        if len(self._running) >= self._limit:
            raise _too_many(self._limit)
        run = self._running[query_id] = Running(query_id)
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._executor, self._execute, run, req, database, fmt)
        except BaseException:
            del self._running[query_id]
            raise
        fut.add_done_callback(lambda f: self._finished(query_id, f))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            if not fut.done():
                self._executor.submit(self._cancel, run)
            raise

    def _finished(self, query_id: str, fut: asyncio.Future[Any]) -> None:
        del self._running[query_id]
        if not fut.cancelled():
            fut.exception()  # retrieved here too, for requests that stopped waiting

    def _execute(self, run: Running, req: QueryRequest, database: str, fmt: str) -> tuple[Statement, int, bytes]:
        """In a worker thread: normalise, check, run, compress; the size is before compression."""
        try:
            normal = self._raw(f"SELECT formatQuerySingleLine({quote_string(req.sql)}) SETTINGS readonly = 1",
                               "RawBLOB")
            stmt = inspect(normal.decode("utf-8", "replace"))
            if run.cancelled.is_set():
                raise QueryError(394, "QUERY_WAS_CANCELLED", "Query was cancelled")
            data = self._raw(build_sql(stmt, database, req.settings, run.query_id), fmt)
        finally:
            run.finished.set()
        enc = req.accept_encoding
        return stmt, len(data), compress(data, enc, req.compression_level) if enc else data

    def _cancel(self, run: Running) -> None:
        """In a worker thread: kill the request's statement until its thread returns."""
        run.cancelled.set()
        while not run.finished.is_set():
            self._kill([run.query_id])
            run.finished.wait(KILL_RETRY_SECONDS)

    def _kill(self, query_ids: list[str]) -> None:
        try:
            self._store.raw_read(kill_sql(query_ids))
        except StoreError as e:  # the statement still ends at its max_execution_time
            log.warning("cannot kill queries error=%s", e)

    async def shutdown(self) -> None:
        """Kill what still runs, so that stopping the collector does not wait for long reads."""
        if self._running:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._kill, list(self._running))

    async def cleanup(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _authenticate(self, request: web.Request) -> None:
        if not self._user:
            return
        given = credentials(request.query, request.headers)
        if given is None:
            raise QueryError(194, "REQUIRED_PASSWORD", "Authentication required: use HTTP Basic auth, "
                             "X-ClickHouse-User/X-ClickHouse-Key headers or user/password parameters")
        user_ok = hmac.compare_digest(given[0].encode(), self._user.encode())
        password_ok = hmac.compare_digest(given[1].encode(), self._password.encode())
        if not (user_ok and password_ok):
            raise QueryError(516, "AUTHENTICATION_FAILED", f"{given[0]}: Authentication failed: password is "
                             "incorrect, or there is no user with such name")

    async def _server_facts(self) -> ServerFacts:
        async with self._facts_lock:
            if self._facts is None:
                self._facts = await asyncio.get_running_loop().run_in_executor(self._executor, self._read_facts)
            return self._facts

    def _read_facts(self) -> ServerFacts:
        head = self._raw("SELECT timezone(), (SELECT count() FROM system.databases WHERE name = "
                         f"{quote_string(self._store.database)})").decode().split("\t")
        rows = self._raw("SELECT name, content_type FROM system.formats WHERE is_output").decode().splitlines()
        formats = {}
        for row in rows:
            name, _, ctype = row.partition("\t")
            formats[name.lower()] = (name, ctype or "text/plain; charset=UTF-8")
        default_db = self._store.database if head[1].strip() != "0" else "default"
        return ServerFacts(head[0], formats, default_db)

    def _raw(self, sql: str, fmt: str = "TabSeparated") -> bytes:
        try:
            return self._store.raw_read(sql, fmt)
        except StoreError as e:
            raise QueryError.from_store(str(e)) from None


def _error_response(e: QueryError, headers: dict[str, str]) -> web.Response:
    headers = {**headers, "X-ClickHouse-Exception-Code": str(e.code)}
    if e.code == 194:
        headers["WWW-Authenticate"] = 'Basic realm="meshlens query endpoint"'
    return web.Response(status=e.status, text=e.body(), headers=headers, charset="UTF-8")


def make_query_app(store: EmbeddedStore, *, user: str = "", password: str = "",
                   max_concurrent_queries: int = MAX_CONCURRENT_QUERIES) -> web.Application:
    """The read-only ClickHouse HTTP interface over `store`; with `user`, clients must authenticate."""
    if max_concurrent_queries < 1:
        raise ValueError(f"max_concurrent_queries must be at least 1, got {max_concurrent_queries}")
    endpoint = QueryEndpoint(store, user, password, max_concurrent_queries)
    # Bodies are decoded here, with ClickHouse's error codes and a bound on the output;
    # handler_cancellation: a client that disconnects cancels its handler, which kills its query.
    app = web.Application(client_max_size=MAX_QUERY_BYTES,
                          handler_args={"auto_decompress": False, "max_line_size": MAX_URL_BYTES,
                                        "handler_cancellation": True})
    app.router.add_route("*", "/", endpoint.root)
    app.router.add_route("*", "/ping", endpoint.ok)
    app.router.add_route("*", "/replicas_status", endpoint.ok)
    app.on_shutdown.append(lambda _app: endpoint.shutdown())
    app.on_cleanup.append(lambda _app: endpoint.cleanup())
    return app

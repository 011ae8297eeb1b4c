"""The query endpoint against a live app: clickhouse-connect unchanged, curl-style requests, refusals, concurrency."""
from __future__ import annotations

import asyncio
import base64
import gzip
import json
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from urllib.parse import urlencode, urlsplit
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import urllib3
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector import batch_format
from meshlens.collector.config import MAX_CONCURRENT_QUERIES, CollectorConfig
from meshlens.collector.query_http import make_query_app
from meshlens.collector.query_protocol import (
    DEFAULT_MAX_EXECUTION_TIME,
    ENCODINGS,
    MAX_QUERY_BYTES,
    Statement,
    build_sql,
    lz4_frame,
    zstd,
)
from meshlens.collector.stores import connect
from meshlens.collector.stores.base import StoreError
from meshlens.collector.stores.http import HttpStore
from meshlens.collector.stores.embedded import EmbeddedStore
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S, wait_until

clickhouse_connect = pytest.importorskip("clickhouse_connect")
from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

ROWS = [
    (1, "/a", "GET", 0.5),
    (2, "/b", "POST", 1.5),
    (3, "/c", "GET", 2.5),
]
http = urllib3.PoolManager(retries=False, timeout=PATIENCE_S, maxsize=16)
# 10^15 rows: hours on any machine, so "still running" never depends on how fast this one is.
LONG_SQL = "SELECT count() FROM numbers(1000000000000000)"


class LoopThread:
    """An event loop in a background thread that serves aiohttp apps on ephemeral loopback ports."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def serve(self, app: web.Application) -> str:
        async def start() -> int:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path_factory.mktemp("query_http"), "meshlens")
    s.command("CREATE DATABASE IF NOT EXISTS meshlens")
    s.command("CREATE TABLE meshlens.calls (id UInt32, path String, method LowCardinality(String), "
              "latency Float64) ENGINE = MergeTree ORDER BY id")
    s.command("INSERT INTO meshlens.calls VALUES " + ", ".join(f"({i}, '{p}', '{m}', {x})" for i, p, m, x in ROWS))
    s.command("CREATE DATABASE IF NOT EXISTS other")
    s.command("CREATE TABLE other.calls (x String) ENGINE = Memory")
    s.command("INSERT INTO other.calls VALUES ('other')")
    yield s
    s.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def url(loop_thread: LoopThread, store: EmbeddedStore) -> str:
    return loop_thread.serve(make_query_app(store))


@pytest.fixture(scope="module")
def auth_url(loop_thread: LoopThread, store: EmbeddedStore) -> str:
    return loop_thread.serve(make_query_app(store, user="reader", password="s3cret"))


def get(url: str, **fields: str) -> urllib3.BaseHTTPResponse:
    return http.request("GET", url + "/", fields=fields)


def post(url: str, body: bytes | str, *, headers: dict[str, str] | None = None,
         decode: bool = True, **fields: str) -> urllib3.BaseHTTPResponse:
    query = urlencode(fields) if fields else ""
    data = body.encode() if isinstance(body, str) else body
    return http.request("POST", f"{url}/?{query}", body=data, headers=headers, decode_content=decode)


def assert_still_serving(url: str) -> None:
    assert http.request("GET", url + "/ping").data == b"Ok.\n"
    r = post(url, "SELECT count() FROM meshlens.calls")
    assert (r.status, r.data) == (200, f"{len(ROWS)}\n".encode())


class LongQuery:
    """LONG_SQL sent on a socket of its own: the test can see it has not answered yet, read its answer or hang up."""

    def __init__(self, url: str, query_id: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=PATIENCE_S)
        body = LONG_SQL.encode()
        self.sock.sendall(f"POST /?query_id={query_id}&max_execution_time=36000 HTTP/1.1\r\nHost: x\r\n"
                          f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def answered(self) -> bool:
        """Whether any byte of an answer has arrived, without waiting for one."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def response(self) -> tuple[int, str, bytes]:
        """Wait for the answer: status, X-ClickHouse-Exception-Code, body."""
        resp = HTTPResponse(self.sock)
        resp.begin()
        return resp.status, resp.headers.get("X-ClickHouse-Exception-Code", ""), resp.read()

    def hang_up(self) -> None:
        self.sock.close()


def running(store: EmbeddedStore | HttpStore) -> set[str]:
    """Query ids (the endpoint tags each statement's log_comment with it) of what chdb is running now."""
    rows = store.query_rows("SELECT Settings['log_comment'] FROM system.processes")
    return {r[0] for r in rows if r[0]}


# --- health ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/ping", "/replicas_status"])
def test_health_paths_answer_ok(url: str, path: str) -> None:
    r = http.request("GET", url + path)
    assert (r.status, r.data) == (200, b"Ok.\n")


def test_unknown_path_is_404(url: str) -> None:
    assert http.request("GET", url + "/nope").status == 404


# --- clickhouse-connect, unchanged ----------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_clickhouse_connect_queries(url: str, compress: bool) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=compress)
    assert client.server_version.startswith("26.")
    result = client.query("SELECT id, path, method, latency FROM meshlens.calls ORDER BY id")
    assert result.column_names == ("id", "path", "method", "latency")
    assert [tuple(r) for r in result.result_rows] == ROWS
    df = client.query_df("SELECT * FROM calls ORDER BY id")  # default database: the store's
    assert list(df["path"]) == ["/a", "/b", "/c"] and df["latency"].sum() == 4.5
    table = client.query_arrow("SELECT path, method FROM calls ORDER BY id")
    assert table.column("method").to_pylist() == ["GET", "POST", "GET"]
    assert client.command("SELECT 1") == 1
    assert client.query("SELECT id FROM calls WHERE id > 10").result_rows == []
    client.close()


def test_clickhouse_connect_database_selects_database(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, database="other")
    assert client.query("SELECT x FROM calls").result_rows == [("other",)]
    with pytest.raises(DatabaseError, match="UNKNOWN_DATABASE"):
        clickhouse_connect.get_client(host="127.0.0.1", port=port, database="missing").query("SELECT 1")


@pytest.mark.parametrize("compress", [True, False])
def test_clickhouse_connect_insert_is_refused_as_readonly(url: str, compress: bool) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=compress)
    with pytest.raises(DatabaseError) as info:
        client.insert("calls", [[9, "/x", "GET", 1.0]], column_names=["id", "path", "method", "latency"])
    assert info.value.code == 164
    assert client.query("SELECT count() FROM calls").result_rows == [(len(ROWS),)]


@pytest.mark.parametrize("sql, code", [
    ("INSERT INTO calls VALUES (9, '/x', 'GET', 1)", 164),
    ("DROP TABLE meshlens.calls", 164),
    ("SELECT * FROM file('/etc/passwd')", 164),
    ("SELECT 1; DROP TABLE meshlens.calls", 62),
])
def test_clickhouse_connect_sees_refusals(url: str, sql: str, code: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port)
    with pytest.raises(DatabaseError) as info:
        client.command(sql)
    assert info.value.code == code
    assert client.query("SELECT count() FROM calls").result_rows == [(len(ROWS),)]


def test_meshlens_http_store_reads_through_the_endpoint(url: str, auth_url: str) -> None:
    remote = HttpStore(url, url, "", "", "meshlens")
    remote.check_version()
    names, rows = remote.query_table("SELECT id, path FROM meshlens.calls ORDER BY id")
    assert (names, rows) == (["id", "path"], [(i, p) for i, p, _, _ in ROWS])
    assert remote.query_arrow("SELECT method FROM meshlens.calls ORDER BY id").column(0).to_pylist() == \
        ["GET", "POST", "GET"]
    with pytest.raises(StoreError, match="READONLY"):
        remote.command("DROP TABLE meshlens.calls")
    with pytest.raises(StoreError, match="READONLY"):
        remote.insert("meshlens.calls", pa.table({"id": [9]}), "token-1")
    assert HttpStore(auth_url, auth_url, "reader", "s3cret", "meshlens").query_rows("SELECT 1") == [(1,)]
    remote.close()


# --- auth -----------------------------------------------------------------------------------

def test_auth_right_credentials(auth_url: str) -> None:
    port = int(auth_url.rsplit(":", 1)[1])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, username="reader", password="s3cret")
    assert client.command("SELECT 1") == 1
    by_header = post(auth_url, "SELECT 2", headers={"X-ClickHouse-User": "reader", "X-ClickHouse-Key": "s3cret"})
    by_params = post(auth_url, "SELECT 3", user="reader", password="s3cret")
    assert (by_header.data, by_params.data) == (b"2\n", b"3\n")


def test_auth_wrong_credentials(auth_url: str) -> None:
    port = int(auth_url.rsplit(":", 1)[1])
    with pytest.raises(DatabaseError) as info:
        clickhouse_connect.get_client(host="127.0.0.1", port=port, username="reader", password="wrong")
    assert info.value.code == 516
    basic = "Basic " + base64.b64encode(b"reader:nope").decode()
    r = post(auth_url, "SELECT 1", headers={"Authorization": basic})
    assert r.status == 403 and r.headers["X-ClickHouse-Exception-Code"] == "516"
    assert r.data.startswith(b"Code: 516. DB::Exception: reader: Authentication failed")
    assert r.data.rstrip().endswith(b"(AUTHENTICATION_FAILED)")


def test_auth_missing_or_mixed_credentials(auth_url: str) -> None:
    r = post(auth_url, "SELECT 1")
    assert r.status == 401 and r.headers["X-ClickHouse-Exception-Code"] == "194"
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    mixed = post(auth_url, "SELECT 1", headers={"X-ClickHouse-User": "reader", "X-ClickHouse-Key": "s3cret"},
                 user="reader")
    assert mixed.status == 403 and b"simultaneously" in mixed.data
    assert http.request("GET", auth_url + "/ping").status == 200  # health needs no credentials


# --- read-only ------------------------------------------------------------------------------

REFUSED = [
    ("INSERT INTO meshlens.calls VALUES (9, '/x', 'GET', 1)", 164),
    ("insert into meshlens.calls select * from meshlens.calls", 164),
    ("DROP TABLE meshlens.calls", 164),
    ("TRUNCATE TABLE meshlens.calls", 164),
    ("ALTER TABLE meshlens.calls DELETE WHERE 1", 164),
    ("CREATE TABLE meshlens.x (a UInt8) ENGINE = Memory", 164),
    ("SET max_threads = 1", 164),
    ("SYSTEM FLUSH LOGS", 164),
    ("KILL QUERY WHERE 1", 164),
    ("USE other", 164),
    ("OPTIMIZE TABLE meshlens.calls FINAL", 164),
    ("SELECT * FROM file('/etc/passwd')", 164),
    ("SELECT file('/etc/passwd')", 164),
    ("SELECT * FROM `file`('/etc/passwd', 'LineAsString')", 164),
    ("DESCRIBE TABLE file('/etc/passwd')", 164),
    ("SELECT * FROM url('http://127.0.0.1:1/x', CSV)", 164),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/x.csv')", 164),
    ("SELECT * FROM remote('127.0.0.1', system.one)", 164),
    ("SELECT * FROM executable('id', 'TSV', 'x String')", 164),
    ("SELECT * FROM Python(store)", 164),
    ("SELECT * FROM mysql('127.0.0.1:1', 'db', 't', 'u', 'p')", 164),
    ("SELECT * FROM view(SELECT * FROM FILE('/etc/passwd'))", 164),
    ("SELECT * FROM eval('SELECT 1')", 164),
    ("SELECT 1 INTO OUTFILE '/tmp/meshlens-query-http-outfile'", 358),
    ("SELECT 1; SELECT 2", 62),
    ("SELECT 1; DROP TABLE meshlens.calls", 62),
    ("SELECT 1 /* ; */; DROP TABLE meshlens.calls", 62),
    ("SELECT 1 /* /* */ ; DROP TABLE meshlens.calls; -- */", 200),  # nested comment: just SELECT 1
    ("SELECT '\\'; DROP TABLE meshlens.calls; --'", 200),  # all one string literal: harmless
    ("SELECT 1 FORMAT JSON SETTINGS readonly = 0", 164),
    ("SELECT 1 SETTINGS max_threads = 1", 164),  # settings go in URL parameters
]


@pytest.mark.parametrize("sql, code", REFUSED)
def test_read_only_refusals_then_keeps_serving(url: str, sql: str, code: int) -> None:
    r = post(url, sql)
    if code == 200:
        assert r.status == 200
    else:
        assert r.headers["X-ClickHouse-Exception-Code"] == str(code), r.data
        assert r.status == (400 if code == 62 else 500)
        text = r.data.decode()
        assert text.startswith(f"Code: {code}. DB::Exception: ") and text.endswith(")\n"), text
        assert "formatQuerySingleLine" not in text
    assert_still_serving(url)


@pytest.mark.parametrize("text", [
    "INSERT INTO meshlens.calls SELECT * FROM meshlens.calls",
    "DROP TABLE meshlens.calls",
    "SELECT * FROM url('http://127.0.0.1:1/x', CSV)",
    "SELECT * FROM executable('id', 'TSV', 'x String')",
])
def test_readonly_setting_is_a_second_line(store: EmbeddedStore, text: str) -> None:
    """Were the statement check bypassed, the readonly = 1 that build_sql appends still refuses."""
    with pytest.raises(StoreError, match="READONLY"):
        store.raw_query(build_sql(Statement(text, None), "meshlens", {}))
    assert store.query_rows("SELECT count() FROM meshlens.calls") == [(len(ROWS),)]


def test_outfile_was_not_written(url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = tmp_path_factory.mktemp("outfile") / "out.tsv"
    r = post(url, f"SELECT 1 INTO OUTFILE '{target}'")
    assert r.status == 500 and not target.exists()


# --- curl-style -----------------------------------------------------------------------------

def test_query_in_url(url: str) -> None:
    r = get(url, query="SELECT path FROM meshlens.calls ORDER BY id", query_id="my-query-1")
    assert (r.status, r.data) == (200, b"/a\n/b\n/c\n")
    assert r.headers["Content-Type"] == "text/tab-separated-values; charset=UTF-8"
    assert r.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert r.headers["X-ClickHouse-Query-Id"] == "my-query-1"
    assert r.headers["X-ClickHouse-Timezone"] in ("UTC", "Etc/UTC")
    assert r.headers["X-ClickHouse-Server-Display-Name"]
    assert json.loads(r.headers["X-ClickHouse-Summary"])["result_bytes"] == "9"


def test_url_query_and_body_concatenate(url: str) -> None:
    r = post(url, "ORDER BY id DESC LIMIT 1", query="SELECT id FROM meshlens.calls")
    assert (r.status, r.data) == (200, b"3\n")


def test_default_format_and_format_clause(url: str) -> None:
    r = post(url, "SELECT id, path FROM meshlens.calls WHERE id = 1", default_format="JSONEachRow")
    assert r.data == b'{"id":1,"path":"\\/a"}\n'
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    assert r.headers["X-ClickHouse-Format"] == "JSONEachRow"
    r = post(url, "SELECT 1 AS x FORMAT JSONCompact", default_format="JSONEachRow")
    assert json.loads(r.data)["data"] == [[1]]
    assert r.headers["X-ClickHouse-Format"] == "JSONCompact"
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
    r = post(url, "SELECT 1", headers={"X-ClickHouse-Format": "CSVWithNames"})
    assert r.data == b'"1"\n1\n'
    r = post(url, "SELECT 1 FORMAT Native")
    assert r.headers["Content-Type"] == "application/octet-stream"


def test_database_parameter_and_header(url: str) -> None:
    assert post(url, "SELECT x FROM calls", database="other").data == b"other\n"
    assert post(url, "SELECT x FROM calls", headers={"X-ClickHouse-Database": "other"}).data == b"other\n"
    assert post(url, "SELECT count() FROM calls").data == b"3\n"
    r = post(url, "SELECT 1", database="no`such")
    assert r.status == 404 and r.headers["X-ClickHouse-Exception-Code"] == "81"


@pytest.mark.parametrize("fields, sql", [({"default_format": "NoSuchFormat"}, "SELECT 1"),
                                         ({}, "SELECT 1 FORMAT NoSuchFormat")])
def test_unknown_format(url: str, fields: dict[str, str], sql: str) -> None:
    r = post(url, sql, **fields)
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (404, "73")
    assert r.data.startswith(b"Code: 73. DB::Exception: Unknown format NoSuchFormat")
    assert r.data.endswith(b"(UNKNOWN_FORMAT)\n")
    assert r.data.count(b"Code:") == 1


@pytest.mark.parametrize("sql, status, code", [
    ("SELEC 1", 400, 62),
    ("SELECT nope FROM meshlens.calls", 404, 47),
    ("SELECT * FROM meshlens.nope", 404, 60),
    ("SELECT throwIf(1)", 500, 395),
    ("", 400, 62),
    ("SELECT 'a\nb' AS x,\n  nope", 404, 47),
])
def test_store_errors_in_clickhouse_terms(url: str, sql: str, status: int, code: int) -> None:
    r = post(url, sql)
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (status, str(code)), r.data
    assert r.data.startswith(f"Code: {code}. DB::Exception: ".encode())
    assert_still_serving(url)


def test_url_settings_applied_unknown_ones_ignored(url: str) -> None:
    r = post(url, "SELECT toUInt64(1) AS x", default_format="JSONEachRow",
             output_format_json_quote_64bit_integers="1", no_such_setting="1", wait_end_of_query="1",
             send_progress_in_http_headers="1", http_headers_progress_interval_ms="120000",
             session_id="abc", session_timeout="60", cancel_http_readonly_queries_on_client_close="1",
             client_protocol_version="54405", readonly="0", quota_key="q", buffer_size="1000")
    assert (r.status, r.data) == (200, b'{"x":"1"}\n')
    r = post(url, "SELECT getSetting('max_result_rows')", max_result_rows="7")
    assert r.data == b"7\n"


def test_execution_time_is_bounded_by_default(url: str) -> None:
    r = post(url, "SELECT getSetting('max_execution_time')")
    assert r.data == f"{DEFAULT_MAX_EXECUTION_TIME}\n".encode()
    r = post(url, LONG_SQL, max_execution_time="0.2")
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (408, "159")
    assert_still_serving(url)


def test_form_encoded_body_is_still_the_query(url: str) -> None:
    r = post(url, "SELECT 7", headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
    assert r.data == b"7\n"
    r = post(url, "SELECT 1", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (501, "48")


def test_refused_parameters(url: str) -> None:
    for fields in ({"compress": "1"}, {"decompress": "1"}, {"param_x": "1"}):
        r = post(url, "SELECT {x:UInt8}" if "param_x" in fields else "SELECT 1", **fields)
        assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (501, "48"), fields
    assert post(url, "SELECT 1", compress="0").data == b"1\n"


# --- compression and limits -----------------------------------------------------------------

@pytest.mark.parametrize("accept", ["gzip", "deflate", "zstd", "lz4"])
def test_compressed_response(url: str, accept: str) -> None:
    if accept not in ENCODINGS:
        pytest.skip(f"no {accept} module")
    r = post(url, "SELECT number FROM numbers(1000)", headers={"Accept-Encoding": accept},
             decode=False, enable_http_compression="1")
    assert r.headers["Content-Encoding"] == accept
    plain = {"gzip": gzip.decompress, "deflate": zlib.decompress, "zstd": lambda b: zstd.decompress(b),
             "lz4": lambda b: lz4_frame.decompress(b)}[accept](r.data)  # type: ignore[union-attr]
    assert plain == "".join(f"{i}\n" for i in range(1000)).encode()
    off = post(url, "SELECT 1", headers={"Accept-Encoding": accept}, decode=False, enable_http_compression="0")
    assert "Content-Encoding" not in off.headers and off.data == b"1\n"


def test_compressed_request_body(url: str) -> None:
    r = post(url, gzip.compress(b"SELECT 42"), headers={"Content-Encoding": "gzip"})
    assert r.data == b"42\n"
    r = post(url, zlib.compress(b"SELECT 43"), headers={"Content-Encoding": "deflate"})
    assert r.data == b"43\n"
    r = post(url, b"not gzip", headers={"Content-Encoding": "gzip"})
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (500, "271")
    r = post(url, b"SELECT 1", headers={"Content-Encoding": "br"})
    assert r.headers["X-ClickHouse-Exception-Code"] == "89"
    assert_still_serving(url)


def test_size_limits(url: str) -> None:
    r = post(url, b"SELECT 1 -- " + b"x" * MAX_QUERY_BYTES)
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (413, "229")
    bomb = gzip.compress(b" " * (MAX_QUERY_BYTES + 10) + b"SELECT 1")
    r = post(url, bomb, headers={"Content-Encoding": "gzip"})
    assert r.status == 413
    long_url = get(url, query="SELECT 1 -- " + "x" * 20000)  # longer than aiohttp's 8 KiB default
    assert (long_url.status, long_url.data) == (200, b"1\n")
    assert_still_serving(url)


def test_concurrent_clients(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])

    def one(i: int) -> int:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=bool(i % 2))
        return int(client.command(f"SELECT {i} + count() FROM calls"))

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(24))) == [i + len(ROWS) for i in range(24)]


# --- concurrency ------------------------------------------------------------------------

def test_a_short_query_answers_while_a_long_one_runs_then_hanging_up_kills_the_long_one(
        url: str, store: EmbeddedStore) -> None:
    long = LongQuery(url, "long-1")
    try:
        wait_until(lambda: "long-1" in running(store), "the long query runs")
        client = clickhouse_connect.get_client(host="127.0.0.1", port=urlsplit(url).port,
                                               send_receive_timeout=PATIENCE_S)
        # The short query's own answer says the long one was running while it ran.
        short = client.command("SELECT count() FROM system.processes WHERE Settings['log_comment'] = 'long-1'")
        assert short == 1
        assert not long.answered() and "long-1" in running(store)
    finally:
        long.hang_up()
    wait_until(lambda: "long-1" not in running(store), "the long query is killed")
    assert_still_serving(url)


def test_one_query_past_the_limit_is_refused_as_clickhouse_does_the_others_run_on(
        loop_thread: LoopThread, store: EmbeddedStore) -> None:
    limited = loop_thread.serve(make_query_app(store, max_concurrent_queries=2))
    first, second = LongQuery(limited, "limit-1"), LongQuery(limited, "limit-2")
    try:
        wait_until(lambda: {"limit-1", "limit-2"} <= running(store), "both long queries run")
        r = post(limited, "SELECT 1")
        assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (500, "202")
        assert r.data == (b"Code: 202. DB::Exception: Too many simultaneous queries. Maximum: 2 "
                          b"(the collector's query_max_concurrent). (TOO_MANY_SIMULTANEOUS_QUERIES)\n")
        assert not first.answered() and not second.answered()
        assert {"limit-1", "limit-2"} <= running(store)
        store.command("KILL QUERY WHERE Settings['log_comment'] = 'limit-1' SYNC")
        assert first.response()[:2] == (500, "394")  # QUERY_WAS_CANCELLED; its slot is free before it answers
        assert post(limited, "SELECT 1").data == b"1\n"
        assert not second.answered() and "limit-2" in running(store)
    finally:
        first.hang_up()
        second.hang_up()
    wait_until(lambda: "limit-2" not in running(store), "the second long query is killed")
    assert_still_serving(limited)


def test_a_query_id_already_running_is_refused(url: str, store: EmbeddedStore) -> None:
    long = LongQuery(url, "same-id")
    try:
        wait_until(lambda: "same-id" in running(store), "the long query runs")
        r = post(url, "SELECT 1", query_id="same-id")
        assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (500, "216")
        assert r.data == b"Code: 216. DB::Exception: Query with id = same-id is already running. " \
                         b"(QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING)\n"
    finally:
        long.hang_up()
    wait_until(lambda: "same-id" not in running(store), "the long query is killed")
    assert post(url, "SELECT 1", query_id="same-id").data == b"1\n"


def test_stopping_the_endpoint_kills_its_running_queries(store: EmbeddedStore) -> None:
    own = LoopThread()
    long = LongQuery(own.serve(make_query_app(store)), "at-shutdown")
    try:
        wait_until(lambda: "at-shutdown" in running(store), "the long query runs")
        own.close()
        assert long.response()[:2] == (500, "394")
        assert "at-shutdown" not in running(store)
    finally:
        long.hang_up()


def test_the_default_limit_is_the_collectors(store: EmbeddedStore) -> None:
    assert CollectorConfig(store="chdb:/unused").query_max_concurrent == MAX_CONCURRENT_QUERIES
    with pytest.raises(ValueError, match="max_concurrent_queries"):
        make_query_app(store, max_concurrent_queries=0)


def test_ingestion_completes_while_a_long_read_runs(tmp_path: Path) -> None:
    with CollectorProcess(tmp_path) as col:
        remote = connect(col.query_url)
        long = LongQuery(col.query_url, "long-read")
        try:
            wait_until(lambda: "long-read" in running(remote), "the long query runs")
            now = time.time_ns()  # recent: the calls table drops rows older than its retention
            batch = batch_format.encode({"time": [now + i for i in range(100)], "dst_service": ["checkout"] * 100})
            r = http.request("POST", f"{col.base}/v1/calls", body=batch,
                             headers={"Content-Type": batch_format.CONTENT_TYPE})
            assert r.status == 200, r.data
            wait_until(lambda: remote.query_rows("SELECT count() FROM meshlens.calls") == [(100,)],
                       "the batch is queryable")
            assert not long.answered() and "long-read" in running(remote)
        finally:
            long.hang_up()
        wait_until(lambda: "long-read" not in running(remote), "the long query is killed")
        remote.close()


# --- fuzz -----------------------------------------------------------------------------------

PARAM_NAMES = st.sampled_from(["query", "database", "default_format", "query_id", "max_threads",
                               "output_format_json_quote_64bit_integers", "session_timezone",
                               "enable_http_compression", "http_zlib_compression_level", "user",
                               "readonly", "max_result_rows", "x y", "ü", "param_", "limit"])
FRAGMENTS = st.sampled_from(["SELECT", "1", ";", "'", "`", '"', "/*", "*/", "--", "\n", "(", ")",
                             "FROM", "file", "FORMAT", "JSON", "SETTINGS", "readonly", "=", "DROP",
                             "meshlens.calls", "INTO OUTFILE", "\\", "{x:UInt8}", ",", "#!", "\x00"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=st.one_of(st.text(max_size=60), st.lists(FRAGMENTS, max_size=12).map(" ".join)),
       params=st.dictionaries(PARAM_NAMES, st.text(max_size=12), max_size=4),
       method=st.sampled_from(["GET", "POST"]))
def test_fuzz_never_breaks_the_server(url: str, sql: str, params: dict[str, str], method: str) -> None:
    fields = {**params, "query": sql} if method == "GET" else params
    body = None if method == "GET" else sql.encode("utf-8", "surrogatepass")
    r = http.request(method, url + "/?" + urlencode(fields), body=body)
    assert r.status < 600
    if r.status != 200:
        assert r.headers["X-ClickHouse-Exception-Code"].isdigit()
    assert http.request("GET", url + "/ping").data == b"Ok.\n"
    assert post(url, "SELECT count() FROM meshlens.calls").data == f"{len(ROWS)}\n".encode()

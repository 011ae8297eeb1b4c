"""Store URLs; the Store interface against every backend; the schema on the embedded store.

Backends: embedded chdb (ClickHouse 26.9 in-process), and Debian's clickhouse-server
18.16 over the native protocol and over HTTP (skipped when it is not installed).
chdb opens one data directory per process at a time: every embedded store is
closed before its test ends.
"""
from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from meshlens.collector.columns import TRACES_SCHEMA, to_table
from meshlens.collector.schema import MIGRATIONS_TABLE, Layout, Retention, full_ddl, migrate, migrations
from meshlens.collector.stores import (DEFAULT_DATABASE, Store, StoreError, StoreUnavailable, StoreURLError,
                              UnsupportedServer, connect, parse_store_url)
from meshlens.collector.stores.embedded import EmbeddedStore, default_data_dir
from meshlens.collector.stores.http import HttpStore
from meshlens.collector.stores.insert_ledger import LEDGER_FILE, InsertLedger
from meshlens.collector.stores.native import NativeStore
from tests.clickhouse_server import ClickHouseServer, free_port

# -- URL parsing: transcripts ---------------------------------------------------------

NATIVE = {"scheme": "native", "host": "h", "port": 9000, "user": "", "password": "",
          "database": DEFAULT_DATABASE, "cluster": "", "secure": False, "path": ""}
HTTP = {**NATIVE, "scheme": "http", "port": 8123, "path": "/"}

URLS = [
    ("chdb:/srv/meshlens", {"scheme": "chdb", "path": "/srv/meshlens", "database": DEFAULT_DATABASE, "cluster": ""}),
    ("chdb:///srv/m?database=other", {"scheme": "chdb", "path": "/srv/m", "database": "other", "cluster": ""}),
    ("chdb:relative/dir", {"scheme": "chdb", "path": "relative/dir", "database": DEFAULT_DATABASE, "cluster": ""}),
    ("clickhouse://h", NATIVE),
    ("clickhouse://h:9001/db1", {**NATIVE, "port": 9001, "database": "db1"}),
    ("clickhouse://u%40corp:p%40ss%2Fw%3A@h/db?cluster=c1",
     {**NATIVE, "user": "u@corp", "password": "p@ss/w:", "database": "db", "cluster": "c1"}),
    ("clickhouse://h/?database=q", {**NATIVE, "database": "q"}),
    ("clickhouses://h/db", {**NATIVE, "port": 9440, "secure": True, "database": "db"}),
    ("clickhouse://h/db?secure=1", {**NATIVE, "port": 9440, "secure": True, "database": "db"}),
    ("http://h", HTTP),
    ("http://h:8124/?database=db", {**HTTP, "port": 8124, "database": "db"}),
    # HTTP names the database only in ?database=; the path is a prefix (behind a proxy).
    ("http://h/ch/", {**HTTP, "path": "/ch/"}),
    ("https://reader:s%20cret@h/?database=db&cluster=c",
     {**HTTP, "port": 8443, "secure": True, "user": "reader", "password": "s cret", "database": "db", "cluster": "c"}),
    ("http://h/?secure=true", {**HTTP, "port": 8443, "secure": True}),
]


@pytest.mark.parametrize(("url", "expected"), URLS, ids=[u for u, _ in URLS])
def test_parse_store_url(url: str, expected: dict) -> None:
    assert parse_store_url(url) == expected


def test_chdb_without_a_path_uses_the_xdg_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert parse_store_url("chdb:")["path"] == str(tmp_path / "meshlens" / "chdb") == str(default_data_dir())


BAD_URLS = [
    ("", "empty store URL"),
    ("mysql://h/db", "unknown store scheme 'mysql'"),
    ("/var/lib/meshlens", "unknown store scheme '/var/lib/meshlens'"),
    ("clickhouse://h:99999/db", "invalid port"),
    ("clickhouse://u:secret@h:nine/db", "invalid port in store URL 'clickhouse://u:***@h:nine/db'"),
    ("http://:8123/?database=db", "no host"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[u or "empty" for u, _ in BAD_URLS])
def test_bad_store_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(StoreURLError) as err:
        parse_store_url(url)
    assert message in str(err.value)
    assert "secret" not in str(err.value)


@pytest.mark.parametrize(("url", "cls"), [("clickhouse://u:pw@h:1/db", NativeStore),
                                          ("http://u:pw@h:1/?database=db", HttpStore)])
def test_connect_picks_the_backend_without_touching_the_network(url: str, cls: type) -> None:
    store = connect(url)
    assert isinstance(store, cls) and store.database == "db"
    assert repr(store) == f"<{cls.__name__} {url.replace(':pw@', ':***@')}>"
    store.close()


# -- The Store interface, against every backend ---------------------------------------

BACKENDS = ["embedded", "native", "http"]
TABLE_DDL = ("CREATE TABLE {db}.t (id UInt64, name String, v Float64, ts DateTime) "
             "ENGINE = MergeTree() PARTITION BY toYYYYMM(ts) ORDER BY id")  # 18.16 takes this syntax
NAMES = ["plain", "tab\there", "new\nline", "back\\slash 'quoted' \"twice\"", "ünïcødé", ""]
TS = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def sample() -> pa.Table:
    n = len(NAMES)
    return pa.table({
        "id": pa.array(range(1, n + 1), pa.uint64()),
        "name": NAMES,
        "v": [i / 4 for i in range(n)],
        "ts": pa.array([TS + i for i in range(n)], pa.timestamp("s")),
    })


def server_url(request: pytest.FixtureRequest, backend: str, db: str) -> str:
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    return server.native_url(db) if backend == "native" else server.http_url(db)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of each backend whose `database` exists and is empty; dropped or closed afterwards."""
    db = f"t_{uuid.uuid4().hex[:12]}"
    url = f"chdb:{tmp_path / 'chdb'}?database={db}" if request.param == "embedded" else \
        server_url(request, request.param, db)
    s = connect(url)
    try:
        s.command(f"CREATE DATABASE IF NOT EXISTS {db}")  # the URL's database need not exist yet
        yield s
        if request.param != "embedded":
            s.command(f"DROP DATABASE {db}")
    finally:
        s.close()


def test_command_insert_and_read_back(store: Store) -> None:
    db = store.database
    store.command(TABLE_DDL.format(db=db))
    store.insert(f"{db}.t", sample(), token="batch-1")

    names, rows = store.query_table(f"SELECT id, name, v, toUnixTimestamp(ts) AS ts FROM {db}.t ORDER BY id")
    expected = [(i + 1, name, i / 4, TS + i) for i, name in enumerate(NAMES)]
    assert names == ["id", "name", "v", "ts"]
    assert rows == expected
    assert store.query_rows(f"SELECT count(), sum(id), max(v) FROM {db}.t") == [(6, 21, 1.25)]
    # DateTime comes back as a datetime (native) or its text (JSON); both print the same.
    assert [str(r[0]) for r in store.query_rows(f"SELECT ts FROM {db}.t ORDER BY id LIMIT 1")] == ["2023-11-14 22:13:20"]

    arrow = store.query_arrow(f"SELECT id, name, v, toUnixTimestamp(ts) AS ts FROM {db}.t ORDER BY id")
    assert isinstance(arrow, pa.Table)
    assert arrow.to_pydict() == {n: [r[i] for r in expected] for i, n in enumerate(names)}


def test_statements_without_rows_and_empty_results(store: Store) -> None:
    db = store.database
    store.command(TABLE_DDL.format(db=db))
    # INSERT ... SELECT runs on the server; inline VALUES would hang the native protocol.
    store.command(f"INSERT INTO {db}.t (id, name, v, ts) SELECT 7, 'x', 0.5, toDateTime({TS})")
    assert store.query_rows(f"SELECT id, name, v, toUnixTimestamp(ts) FROM {db}.t") == [(7, "x", 0.5, TS)]
    assert store.query_rows(f"SELECT id, name FROM {db}.t WHERE id > 100") == []
    store.command(f"TRUNCATE TABLE {db}.t")
    assert store.query_rows(f"SELECT count() FROM {db}.t") == [(0,)]


def test_clickhouse_errors_become_store_errors_with_its_message(store: Store) -> None:
    db = store.database
    with pytest.raises(StoreError) as missing:
        store.query_rows(f"SELECT * FROM {db}.no_such_table")
    with pytest.raises(StoreError) as syntax:
        store.command(f"CREATE TABLE {db}.broken (")
    with pytest.raises(StoreError) as insert:
        store.insert(f"{db}.no_such_table", sample(), token="t")
    for err in (missing, syntax, insert):
        assert not isinstance(err.value, StoreUnavailable)
    assert "no_such_table" in str(missing.value) and "no_such_table" in str(insert.value)
    assert "Syntax error" in str(syntax.value)


@pytest.mark.parametrize("scheme", ["clickhouse", "http"])
def test_an_unreachable_server_is_unavailable(scheme: str) -> None:
    port = free_port()  # nothing listens there once the probe socket is closed
    s = connect(f"{scheme}://127.0.0.1:{port}/?database=db")
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        s.query_rows("SELECT 1")
    s.close()


@pytest.mark.parametrize("backend", ["native", "http"])
def test_an_old_server_is_refused_naming_both_versions(request: pytest.FixtureRequest, backend: str) -> None:
    s = connect(server_url(request, backend, "default"))
    try:
        assert s.server_version().startswith("18.16.")
        with pytest.raises(UnsupportedServer) as err:
            s.check_version()
    finally:
        s.close()
    assert "ClickHouse 18.16." in str(err.value) and "needs 23.8 or newer" in str(err.value)


# -- The schema, on the embedded store -------------------------------------------------

@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "chdb")
    try:
        yield s
    finally:
        s.close()


def columns(store: Store, table: str) -> list[tuple[str, str, str]]:
    return store.query_rows("SELECT name, type, compression_codec FROM system.columns "
                            f"WHERE database = 'meshlens' AND table = '{table}' ORDER BY position")


def table_info(store: Store, table: str) -> dict[str, str]:
    names, rows = store.query_table("SELECT engine_full, partition_key, sorting_key, primary_key FROM system.tables "
                                    f"WHERE database = 'meshlens' AND name = '{table}'")
    return dict(zip(names, rows[0]))


def count(store: Store, table: str) -> int:
    return int(store.query_rows(f"SELECT count() FROM meshlens.{table}")[0][0])


def calls(n: int, start: int = 0) -> pa.Table:
    now = time.time_ns()
    return to_table("calls", {"time": [now + i for i in range(start, start + n)],
                              "dst_service": ["checkout"] * n, "src_service": ["frontend"] * n,
                              "observer": ["client"] * n, "status": [200] * n,
                              "attributes": [{"seq": str(i)} for i in range(start, start + n)]})


def spans(n: int) -> pa.Table:
    now = time.time_ns()
    return to_table("otel_traces", {
        "Timestamp": [now + i for i in range(n)], "TraceId": [f"{i + 1:032x}" for i in range(n)],
        "SpanId": [f"{i + 1:016x}" for i in range(n)], "ServiceName": ["checkout"] * n,
        "SpanName": ["GET /items"] * n, "Duration": [1_000 * (i + 1) for i in range(n)],
        "SpanAttributes": [{"http.status_code": "200"}] * n,
        "Events.Timestamp": [[now + i] for i in range(n)], "Events.Name": [["retry"]] * n,
        "Events.Attributes": [[{"attempt": "1"}]] * n,
    })


def test_migrate_twice_is_idempotent_and_recorded(embedded: EmbeddedStore) -> None:
    assert migrate(embedded, Layout()) == [m.version for m in migrations(Layout())]
    assert migrate(embedded, Layout()) == []
    recorded = embedded.query_rows(f"SELECT version, name FROM meshlens.{MIGRATIONS_TABLE} ORDER BY version")
    assert recorded == [(m.version, m.name) for m in migrations(Layout())]
    tables = {r[0] for r in embedded.query_rows("SELECT name FROM system.tables WHERE database = 'meshlens'")}
    assert tables == {MIGRATIONS_TABLE, "calls", "otel_traces", "otel_traces_trace_id_ts", "otel_traces_trace_id_ts_mv",
                      "mesh_changes"}


def test_calls_is_partitioned_by_day_and_sorted_by_destination(embedded: EmbeddedStore) -> None:
    # Its columns against the Call record: tests/collector/test_migrations.py, on every backend.
    migrate(embedded, Layout())
    info = table_info(embedded, "calls")
    assert info["partition_key"] == "toDate(time)"
    assert info["sorting_key"].startswith("dst_service, toStartOfHour(time)")


def test_mesh_changes_is_one_row_a_change_by_its_key_partitioned_by_month(embedded: EmbeddedStore) -> None:
    migrate(embedded, Layout())
    info = table_info(embedded, "mesh_changes")
    assert info["engine_full"].startswith("ReplacingMergeTree PARTITION BY toYYYYMM(time)")
    assert (info["partition_key"], info["sorting_key"]) == ("toYYYYMM(time)", "revision, kind, name, time")


def test_otel_traces_follows_the_exporter_layout(embedded: EmbeddedStore) -> None:
    migrate(embedded, Layout())
    cols = {name: (typ, codec) for name, typ, codec in columns(embedded, "otel_traces")}
    assert list(cols) == TRACES_SCHEMA.names
    assert cols["Timestamp"] == ("DateTime64(9)", "CODEC(Delta(8), ZSTD(1))")
    assert cols["Duration"] == ("UInt64", "CODEC(T64, ZSTD(1))")
    assert cols["ServiceName"] == ("LowCardinality(String)", "CODEC(ZSTD(1))")
    assert cols["SpanAttributes"] == ("Map(LowCardinality(String), String)", "CODEC(ZSTD(1))")
    assert cols["Events.Timestamp"] == ("Array(DateTime64(9))", "CODEC(ZSTD(1))")
    info = table_info(embedded, "otel_traces")
    assert info["partition_key"] == "toDate(Timestamp)"
    assert info["primary_key"] == "ServiceName, SpanName, toDateTime(Timestamp)"
    assert info["sorting_key"] == "ServiceName, SpanName, toDateTime(Timestamp), Timestamp"
    indexes = embedded.query_rows("SELECT name, type_full, expr FROM system.data_skipping_indices "
                                  "WHERE database = 'meshlens' AND table = 'otel_traces' ORDER BY name")
    assert indexes == [
        ("idx_duration", "minmax", "Duration"),
        ("idx_res_attr_key", "bloom_filter(0.01)", "mapKeys(ResourceAttributes)"),
        ("idx_res_attr_value", "bloom_filter(0.01)", "mapValues(ResourceAttributes)"),
        ("idx_span_attr_key", "bloom_filter(0.01)", "mapKeys(SpanAttributes)"),
        ("idx_span_attr_value", "bloom_filter(0.01)", "mapValues(SpanAttributes)"),
        ("idx_trace_id", "bloom_filter(0.001)", "TraceId"),
    ]
    lookup = table_info(embedded, "otel_traces_trace_id_ts")
    assert lookup["engine_full"].startswith("AggregatingMergeTree") and lookup["sorting_key"].strip("()") == "TraceId"


def test_retention_changes_alter_the_ttl_and_keep_the_data(embedded: EmbeddedStore) -> None:
    migrate(embedded, Layout())
    assert "TTL toDateTime(time) + toIntervalDay(30)" in table_info(embedded, "calls")["engine_full"]
    embedded.insert("meshlens.calls", calls(3), "c1")
    embedded.insert("meshlens.otel_traces", spans(2), "s1")

    assert migrate(embedded, Layout(retention=Retention(calls_days=3, traces_days=2))) == []
    assert "TTL toDateTime(time) + toIntervalDay(3) SETTINGS" in table_info(embedded, "calls")["engine_full"]
    assert "TTL toDateTime(Timestamp) + toIntervalDay(2)" in table_info(embedded, "otel_traces")["engine_full"]
    assert "TTL toDateTime(Start) + toIntervalDay(2)" in table_info(embedded, "otel_traces_trace_id_ts")["engine_full"]

    assert "TTL toDateTime(time) + toIntervalDay(365)" in table_info(embedded, "mesh_changes")["engine_full"]
    migrate(embedded, Layout(retention=Retention(calls_days=3, traces_days=2, changes_days=90)))
    assert "TTL toDateTime(time) + toIntervalDay(90) SETTINGS" in table_info(embedded, "mesh_changes")["engine_full"]

    migrate(embedded, Layout(retention=Retention(calls_days=0, traces_days=0, changes_days=0)))
    for table in ("calls", "otel_traces", "otel_traces_trace_id_ts", "mesh_changes"):
        assert "TTL" not in table_info(embedded, table)["engine_full"], table
    assert (count(embedded, "calls"), count(embedded, "otel_traces")) == (3, 2)


def test_a_replayed_batch_is_stored_once(embedded: EmbeddedStore) -> None:
    migrate(embedded, Layout())
    batch, traces = calls(3), spans(2)
    for _ in range(2):
        embedded.insert("meshlens.calls", batch, "calls-seg1")
        embedded.insert("meshlens.otel_traces", traces, "traces-seg1")
    assert (count(embedded, "calls"), count(embedded, "otel_traces")) == (3, 2)
    embedded.insert("meshlens.calls", calls(3, start=3), "calls-seg2")  # a new token is a new batch
    assert count(embedded, "calls") == 6
    looked_up = embedded.query_rows("SELECT TraceId FROM meshlens.otel_traces_trace_id_ts GROUP BY TraceId ORDER BY TraceId")
    assert looked_up == [(f"{1:032x}",), (f"{2:032x}",)]


def test_full_ddl_on_a_cluster_replicates_and_distributes() -> None:
    text = "\n".join(full_ddl(Layout(cluster="c1")))
    assert "CREATE DATABASE IF NOT EXISTS `meshlens` ON CLUSTER `c1`" in text
    for local in ("calls_local", "otel_traces_local", "otel_traces_trace_id_ts_local", "mesh_changes_local"):
        assert f"CREATE TABLE IF NOT EXISTS `meshlens`.`{local}` ON CLUSTER `c1`" in text
    assert "ENGINE = ReplicatedMergeTree" in text and "ENGINE = ReplicatedAggregatingMergeTree" in text
    assert "ENGINE = ReplicatedReplacingMergeTree" in text  # the migrations table too
    assert " MergeTree()" not in text
    assert "ENGINE = Distributed(`c1`, `meshlens`, `calls_local`, rand())" in text
    assert "ENGINE = Distributed(`c1`, `meshlens`, `otel_traces_local`, cityHash64(TraceId))" in text
    assert "ENGINE = Distributed(`c1`, `meshlens`, `mesh_changes_local`, revision)" in text
    assert "TO `meshlens`.`otel_traces_trace_id_ts_local`" in text and "FROM `meshlens`.`otel_traces_local`" in text
    single = "\n".join(full_ddl(Layout()))
    assert "ON CLUSTER" not in single and "Replicated" not in single and "Distributed" not in single


# -- A kill -9 inside the embedded store's insert (stores/insert_ledger.py) ------------------

def _killed_in_the_insert(path: Path, table: str, batch: pa.Table, token: str, *, parts_lost: int) -> None:
    """Leave on disk what a `kill -9` inside ClickHouse's insert of `batch` leaves.

    ClickHouse writes each block's deduplication record before it renames the block's part in
    (seen with strace: the record's write(2), then rename(tmp_insert_…)); a kill between the two
    leaves the record without the part. Here: the insert runs, then `parts_lost` of its parts are
    removed, and the ledger is left as `begin` wrote it, the insert never having returned.
    """
    store = EmbeddedStore(path)
    try:
        migrate(store, Layout())
        db, name = table.split(".")
        before = int(store.query_rows(f"SELECT max(max_block_number) FROM system.parts WHERE database = '{db}' "
                                      f"AND table = '{name}' AND active")[0][0])
        store.insert(table, batch, token)
        made = store.query_rows(f"SELECT path FROM system.parts WHERE database = '{db}' AND table = '{name}' "
                                f"AND active AND max_block_number > {before} ORDER BY partition_id")
    finally:
        store.close()
    for (part,) in made[:parts_lost]:
        shutil.rmtree(part)
    (path / LEDGER_FILE).unlink()  # as `begin` left it: the insert never returned to write `done`
    InsertLedger(path).begin(token, token, table, before, set())


@pytest.mark.parametrize("parts_lost", [0, 1], ids=["the-part-was-in", "the-part-never-was"])
def test_a_segment_replayed_after_a_kill_inside_its_insert_is_stored_once(tmp_path: Path, parts_lost: int) -> None:
    batch = calls(1000)
    _killed_in_the_insert(tmp_path / "chdb", "meshlens.calls", batch, "meshlens-s1-7-calls", parts_lost=parts_lost)
    store = EmbeddedStore(tmp_path / "chdb")
    try:
        if parts_lost:  # the state the collector met: a replay under the same token alone is dropped
            assert store.query_rows("SELECT count() FROM meshlens.calls") == [(0,)]
        store.insert("meshlens.calls", batch, "meshlens-s1-7-calls")  # the spool's replay, same token
        assert store.query_rows("SELECT count(), uniqExact(attributes['seq']) FROM meshlens.calls") == [(1000, 1000)]
        store.insert("meshlens.calls", batch, "meshlens-s1-7-calls")  # and again: still once
        store.insert("meshlens.calls", calls(5, start=1000), "meshlens-s1-8-calls")
        assert count(store, "calls") == 1005
    finally:
        store.close()


def test_a_segment_over_two_days_whose_insert_was_cut_between_its_parts_is_stored_once(tmp_path: Path) -> None:
    day = 86_400 * 10**9
    batch = to_table("calls", {"time": [time.time_ns() - day * (i % 2) for i in range(100)],
                               "attributes": [{"seq": str(i)} for i in range(100)]})
    _killed_in_the_insert(tmp_path / "chdb", "meshlens.calls", batch, "meshlens-s1-9-calls", parts_lost=1)
    store = EmbeddedStore(tmp_path / "chdb")
    try:
        assert count(store, "calls") == 50  # one day's part is in, the other's record has no part
        store.insert("meshlens.calls", batch, "meshlens-s1-9-calls")
        assert store.query_rows("SELECT count(), uniqExact(attributes['seq']) FROM meshlens.calls") == [(100, 100)]
    finally:
        store.close()

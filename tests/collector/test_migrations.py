"""Schema history: released migrations are frozen, a fresh database has the columns the code declares,
and a database an older release left behind upgrades with its rows.

Against the embedded store (chdb) and over HTTP (tests/writable_chdb_server.py: chdb behind the
ClickHouse HTTP interface, in its own process). Debian's clickhouse-server 18.16 is older than the
supported minimum, so it is no target here.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlens.collector.changes import CHANGE_COLUMNS
from meshlens.collector.columns import OTEL_TRACES, to_table
from meshlens.collector.record import CALL_COLUMNS
from meshlens.collector.schema import (MIGRATIONS_TABLE, Layout, Migration, Retention, add_columns, bootstrap_ddl,
                                       full_ddl, migrate, migrations)
from meshlens.collector.stores import Store, connect
from tests.clickhouse_server import free_port
from tests.collector.test_stores import calls, columns, count, spans

WRITABLE_SERVER = Path(__file__).resolve().parents[1] / "writable_chdb_server.py"
LAYOUT = Layout()
CLUSTER = Layout("obs", "prod", Retention(90, 3))

# sha256 (first 16 hex digits) of each released migration's statements, joined by "\n;\n".
# A mismatch means a released migration was edited: databases that ran it have the old text.
# Append a new migration instead.
FROZEN: dict[Layout, dict[int, str]] = {
    LAYOUT: {1: "812859c0ad41ae88", 2: "65658e1d308008de", 3: "44d3c051c55ed936", 4: "43b9b887c6b2b234"},
    CLUSTER: {1: "e7b9d70847f28f27", 2: "ff2e7c6315276f4e", 3: "da9877f4553b989d", 4: "e2adfc72f6aa7002"},
}

# Columns of `calls` that migrations after 1 added (a row as migration 1's release wrote it lacks them).
ADDED_SINCE_1 = ["response_flags"]
# A column a later release might add: the ALTER path, proven on stores that hold rows.
REGION = [("region", "LowCardinality(String)", "CODEC(ZSTD(1))"), ("zone", "String", "CODEC(ZSTD(1))")]


@pytest.fixture(params=["embedded", "http"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store of each backend, with nothing migrated; closed (and its server stopped) afterwards."""
    if request.param == "embedded":
        s = connect(f"chdb:{tmp_path / 'chdb'}")
        try:
            yield s
        finally:
            s.close()
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, str(WRITABLE_SERVER), str(tmp_path / "store"), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        s = connect(f"http://127.0.0.1:{port}/?database=meshlens")
        try:
            yield s
        finally:
            s.close()
    finally:
        server.terminate()
        server.wait(30)


def schema_of(store: Store, table: str) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in columns(store, table)]


def recorded_versions(store: Store) -> list[int]:
    return [int(r[0]) for r in store.query_rows(f"SELECT version FROM meshlens.{MIGRATIONS_TABLE} ORDER BY version")]


# -- the history as written ---------------------------------------------------------------

@pytest.mark.parametrize("lay", list(FROZEN), ids=["single", "cluster"])
def test_released_migrations_are_frozen(lay: Layout) -> None:
    got = {m.version: hashlib.sha256("\n;\n".join(m.statements).encode()).hexdigest()[:16] for m in migrations(lay)}
    assert {v: got[v] for v in FROZEN[lay]} == FROZEN[lay], "a released migration was edited: append a new one"
    assert [m.version for m in migrations(lay)] == list(range(1, len(got) + 1))


def test_full_ddl_is_the_bootstrap_then_every_migration_in_order() -> None:
    assert full_ddl(CLUSTER) == bootstrap_ddl(CLUSTER) + [s for m in migrations(CLUSTER) for s in m.statements]


def test_add_columns_on_a_cluster_alters_the_local_and_the_distributed_table() -> None:
    assert add_columns(CLUSTER, "calls", REGION, after="dst_subset") == [
        "ALTER TABLE `obs`.`calls_local` ON CLUSTER `prod` "
        "ADD COLUMN IF NOT EXISTS `region` LowCardinality(String) CODEC(ZSTD(1)) AFTER `dst_subset`, "
        "ADD COLUMN IF NOT EXISTS `zone` String CODEC(ZSTD(1)) AFTER `region`",
        "ALTER TABLE `obs`.`calls` ON CLUSTER `prod` "
        "ADD COLUMN IF NOT EXISTS `region` LowCardinality(String) AFTER `dst_subset`, "
        "ADD COLUMN IF NOT EXISTS `zone` String AFTER `region`",
    ]
    assert add_columns(LAYOUT, "calls", REGION[:1]) == [
        "ALTER TABLE `meshlens`.`calls` ADD COLUMN IF NOT EXISTS `region` LowCardinality(String) CODEC(ZSTD(1))"]


# -- on every backend ---------------------------------------------------------------------

def test_a_fresh_database_has_exactly_the_columns_call_and_the_otel_list_declare(store: Store) -> None:
    assert migrate(store, LAYOUT) == [m.version for m in migrations(LAYOUT)]
    assert schema_of(store, "calls") == [(c.name, c.sql_type, c.codec) for c in CALL_COLUMNS], (
        "calls differs from collector/record.py's Call: a new field needs a migration (schema.add_columns)")
    assert schema_of(store, "otel_traces") == [(c.name, c.sql_type, c.codec) for c in OTEL_TRACES], (
        "otel_traces differs from collector/columns.py's OTEL_TRACES: a new column needs a migration")
    assert schema_of(store, "mesh_changes") == [(c.name, c.sql_type, c.codec) for c in CHANGE_COLUMNS], (
        "mesh_changes differs from collector/changes.py's MeshChange: a new field needs a migration")


def test_a_store_left_at_migration_1_upgrades_with_its_rows(store: Store) -> None:
    assert migrate(store, LAYOUT, migrations(LAYOUT)[:1]) == [1]
    store.insert("meshlens.calls", calls(4).drop_columns(ADDED_SINCE_1), "before-upgrade")  # as that release wrote

    assert migrate(store, LAYOUT) == [2, 3, 4]
    assert recorded_versions(store) == [1, 2, 3, 4]
    seqs = store.query_rows("SELECT attributes['seq'], status, response_flags FROM meshlens.calls ORDER BY time")
    assert [tuple(r) for r in seqs] == [("0", 200, ""), ("1", 200, ""), ("2", 200, ""), ("3", 200, "")]
    store.insert("meshlens.otel_traces", spans(2), "after-upgrade")
    store.insert("meshlens.calls", calls(1, start=4), "after-upgrade")
    assert (count(store, "calls"), count(store, "otel_traces")) == (5, 2)
    assert count(store, "otel_traces_trace_id_ts") == 2  # the view, created by migration 2, fills the lookup


def test_migration_3_adds_response_flags_after_error_to_a_store_at_migration_2(store: Store) -> None:
    assert migrate(store, LAYOUT, migrations(LAYOUT)[:2]) == [1, 2]
    store.insert("meshlens.calls", calls(2).drop_columns(ADDED_SINCE_1), "at-2")

    assert migrate(store, LAYOUT) == [3, 4]
    names = [name for name, _, _ in schema_of(store, "calls")]
    assert names[names.index("error"):names.index("error") + 3] == ["error", "response_flags", "tls"]
    store.insert("meshlens.calls", to_table("calls", {"time": [time.time_ns()], "dst_service": ["checkout"],
                                                      "status": [503], "response_flags": ["UF"]}), "at-3")
    flags = store.query_rows("SELECT status, response_flags FROM meshlens.calls ORDER BY time")
    assert [tuple(r) for r in flags] == [(200, ""), (200, ""), (503, "UF")]


def test_a_column_a_later_migration_adds_reaches_the_rows_already_stored(store: Store) -> None:
    migrate(store, LAYOUT)
    store.insert("meshlens.calls", calls(3), "before-alter")
    later = [*migrations(LAYOUT), Migration(len(migrations(LAYOUT)) + 1, "add calls.region and calls.zone",
                                            add_columns(LAYOUT, "calls", REGION, after="dst_subset"))]

    assert migrate(store, LAYOUT, later) == [later[-1].version]
    assert migrate(store, LAYOUT, later) == []
    names = [name for name, _, _ in schema_of(store, "calls")]
    assert names[names.index("dst_subset"):names.index("dst_subset") + 4] == ["dst_subset", "region", "zone", "dst_addr"]
    assert ("region", "LowCardinality(String)", "CODEC(ZSTD(1))") in schema_of(store, "calls")

    # ADD COLUMN IF NOT EXISTS again, as on a database that already had the columns: nothing changes.
    before = schema_of(store, "calls")
    for stmt in later[-1].statements:
        store.command(stmt)
    assert schema_of(store, "calls") == before

    # Writers that do not know the columns yet still insert; the old rows read the default.
    store.insert("meshlens.calls", calls(2, start=3), "after-alter")
    store.command("INSERT INTO meshlens.calls (time, dst_service, region, zone) "
                  "SELECT now64(9), 'checkout', 'eu-1', 'eu-1a'")
    by_region = store.query_rows("SELECT region, zone, count() FROM meshlens.calls GROUP BY region, zone ORDER BY region")
    assert [tuple(r) for r in by_region] == [("", "", 5), ("eu-1", "eu-1a", 1)]
    assert recorded_versions(store) == [m.version for m in later]


def test_migration_4_creates_mesh_changes_beside_the_rows_of_a_store_at_migration_3(store: Store) -> None:
    assert migrate(store, LAYOUT, migrations(LAYOUT)[:3]) == [1, 2, 3]
    store.insert("meshlens.calls", calls(2), "at-3")
    assert store.query_rows("EXISTS TABLE meshlens.mesh_changes") == [(0,)]

    assert migrate(store, LAYOUT) == [4]
    change = {"time": [time.time_ns()], "revision": [7], "kind": ["Mode"], "name": ["checkout"],
              "action": ["configured"], "from_mode": ["observe"], "to_mode": ["dry-run"]}
    store.insert("meshlens.mesh_changes", to_table("mesh_changes", change), "at-4")
    assert count(store, "calls") == 2
    assert store.query_rows("SELECT revision, name, from_mode, to_mode FROM meshlens.mesh_changes FINAL") == [
        (7, "checkout", "observe", "dry-run")]

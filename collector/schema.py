"""The ClickHouse schema: `calls`, `otel_traces` and its trace-id lookup, `mesh_changes`, as versioned migrations.

`otel_traces`, `otel_traces_trace_id_ts` and `otel_traces_trace_id_ts_mv`
follow the OpenTelemetry Collector ClickHouse exporter's layout column for
column (types, codecs, skip indexes, partitioning, ORDER BY, TTL), so Grafana's
ClickHouse plugin and existing OTel tooling read them unchanged.

Migrations are append-only and recorded in `meshlens_schema_migrations`. Each
one is frozen as written: its statements are literal text (functions of the
Layout only: database, cluster, engine, TTL), never of the live `Call` or column
lists, so what "migration 1" did is what every database that ran it has. A
new column of `calls` (a field added to collector/record.py's `Call`) or of
`otel_traces` comes with a new migration that adds it (`add_columns`);
tests/collector/test_migrations.py fails until it does. Each statement is
idempotent (IF NOT EXISTS), so two collectors starting at once are harmless.
Retention (TTL) is not a migration: it is configuration, applied with
ALTER ... MODIFY TTL whenever it differs from what the table has.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshlens.collector.stores.base import quote_ident

MIGRATIONS_TABLE = "meshlens_schema_migrations"


@dataclass(frozen=True, slots=True)
class Retention:
    """Days of data kept per table; 0 keeps data forever."""

    calls_days: int = 30
    traces_days: int = 7
    changes_days: int = 365


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the tables live and how they are spread over servers."""

    database: str = "meshlens"
    cluster: str = ""
    retention: Retention = field(default_factory=Retention)

    def on_cluster(self) -> str:
        return f"ON CLUSTER {quote_ident(self.cluster)}" if self.cluster else ""

    def local(self, table: str) -> str:
        """Name of the table holding the data (the shard-local one on a cluster)."""
        return f"{table}_local" if self.cluster else table

    def engine(self, kind: str = "MergeTree") -> str:
        return f"Replicated{kind}" if self.cluster else f"{kind}()"


def _ttl(expr: str, days: int) -> str:
    return f"TTL {expr} + toIntervalDay({days})" if days > 0 else ""


def calls_ttl(days: int) -> str:
    return _ttl("toDateTime(time)", days)


def traces_ttl(days: int) -> str:
    return _ttl("toDateTime(Timestamp)", days)


def trace_id_ts_ttl(days: int) -> str:
    return _ttl("toDateTime(Start)", days)


def changes_ttl(days: int) -> str:
    return _ttl("toDateTime(time)", days)


# Both data tables' SETTINGS: non_replicated_deduplication_window is the rows a plain
# MergeTree remembers insert_deduplication_token for. A replayed spool segment is at
# most a few hundred batches behind; 10000 is generous.

def _v1_create_calls(lay: Layout) -> list[str]:
    """Migration 1 as first written (cdc7cfa): `calls` with the 31 columns `Call` had then."""
    db = quote_ident(lay.database)
    local = quote_ident(lay.local("calls"))
    stmts = [f"""CREATE TABLE IF NOT EXISTS {db}.{local} {lay.on_cluster()} (
    `time` DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    `duration_ns` UInt64 CODEC(T64, ZSTD(1)),
    `observer` LowCardinality(String) CODEC(ZSTD(1)),
    `observer_id` LowCardinality(String) CODEC(ZSTD(1)),
    `trace_id` String CODEC(ZSTD(1)),
    `span_id` String CODEC(ZSTD(1)),
    `parent_span_id` String CODEC(ZSTD(1)),
    `src_service` LowCardinality(String) CODEC(ZSTD(1)),
    `src_instance` LowCardinality(String) CODEC(ZSTD(1)),
    `src_addr` String CODEC(ZSTD(1)),
    `src_port` UInt16 CODEC(T64, ZSTD(1)),
    `dst_service` LowCardinality(String) CODEC(ZSTD(1)),
    `dst_subset` LowCardinality(String) CODEC(ZSTD(1)),
    `dst_addr` String CODEC(ZSTD(1)),
    `dst_port` UInt16 CODEC(T64, ZSTD(1)),
    `protocol` LowCardinality(String) CODEC(ZSTD(1)),
    `method` LowCardinality(String) CODEC(ZSTD(1)),
    `authority` LowCardinality(String) CODEC(ZSTD(1)),
    `path` String CODEC(ZSTD(1)),
    `route` LowCardinality(String) CODEC(ZSTD(1)),
    `status` UInt16 CODEC(T64, ZSTD(1)),
    `grpc_status` Int16 CODEC(T64, ZSTD(1)),
    `request_bytes` UInt64 CODEC(T64, ZSTD(1)),
    `response_bytes` UInt64 CODEC(T64, ZSTD(1)),
    `error` LowCardinality(String) CODEC(ZSTD(1)),
    `tls` Bool CODEC(ZSTD(1)),
    `peer_identity` String CODEC(ZSTD(1)),
    `mode` LowCardinality(String) CODEC(ZSTD(1)),
    `action` LowCardinality(String) CODEC(ZSTD(1)),
    `attempt` UInt8 CODEC(T64, ZSTD(1)),
    `attributes` Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_src_service src_service TYPE set(0) GRANULARITY 1,
    INDEX idx_duration duration_ns TYPE minmax GRANULARITY 1,
    INDEX idx_status status TYPE minmax GRANULARITY 1
) ENGINE = {lay.engine()}
PARTITION BY toDate(time)
PRIMARY KEY (dst_service, toStartOfHour(time))
ORDER BY (dst_service, toStartOfHour(time), src_service, observer, time)
{calls_ttl(lay.retention.calls_days)}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000"""]
    if lay.cluster:
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {db}.`calls` {lay.on_cluster()} AS {db}.{local} "
            f"ENGINE = Distributed({quote_ident(lay.cluster)}, {db}, {local}, rand())"
        )
    return stmts


def _v2_create_traces(lay: Layout) -> list[str]:
    """Migration 2 as first written (cdc7cfa): the exporter's otel_traces, its trace-id lookup and view."""
    db = quote_ident(lay.database)
    local = quote_ident(lay.local("otel_traces"))
    lookup = quote_ident(lay.local("otel_traces_trace_id_ts"))
    stmts = [f"""CREATE TABLE IF NOT EXISTS {db}.{local} {lay.on_cluster()} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = {lay.engine()}
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
{traces_ttl(lay.retention.traces_days)}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000""",
             f"""CREATE TABLE IF NOT EXISTS {db}.{lookup} {lay.on_cluster()} (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = {lay.engine('AggregatingMergeTree')}
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
{trace_id_ts_ttl(lay.retention.traces_days)}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1""",
             f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{quote_ident(lay.local('otel_traces_trace_id_ts') + '_mv' if lay.cluster else 'otel_traces_trace_id_ts_mv')} {lay.on_cluster()}
TO {db}.{lookup}
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM {db}.{local}
WHERE TraceId != ''
GROUP BY TraceId"""]
    if lay.cluster:
        for table, key in (("otel_traces", "cityHash64(TraceId)"), ("otel_traces_trace_id_ts", "cityHash64(TraceId)")):
            stmts.append(
                f"CREATE TABLE IF NOT EXISTS {db}.`{table}` {lay.on_cluster()} AS {db}.{quote_ident(lay.local(table))} "
                f"ENGINE = Distributed({quote_ident(lay.cluster)}, {db}, {quote_ident(lay.local(table))}, {key})"
            )
    return stmts


def _v4_create_mesh_changes(lay: Layout) -> list[str]:
    """Migration 4: `mesh_changes`, the control plane's audit rows (collector/changes.py's MeshChange).

    One change is one row for readers, however often it is shipped (two control-plane
    replicas over one etcd both ship it; a control plane resends what it shipped before
    a crash). Three layers:
      - the collector spools a change once by its id (collector/changes.py `change_id`,
        remembered as batch ids are), so a resend is answered 200 and not stored again;
      - a spool segment replayed after a crash is inserted once (its deduplication token);
      - ReplacingMergeTree keyed by (revision, kind, name, time) folds what still comes
        twice (a second collector, an id forgotten since). `time`, the audit entry's own,
        is in the key so that another mesh's control plane, or a store created anew, whose
        revision 7 is another change, never replaces this one's.
    The folding happens when parts merge, at a time of ClickHouse's choosing: until then
    both rows are there. So readers that must see each change once (dashboards, history
    queries) read `FROM mesh_changes FINAL`: the table holds a few rows a minute, which
    FINAL folds at no cost worth measuring, and a change's copies share its partition
    (the month of its time). Partitioned by month, not by day as `calls`: a day of
    changes is a part of a few rows.
    """
    db = quote_ident(lay.database)
    local = quote_ident(lay.local("mesh_changes"))
    stmts = [f"""CREATE TABLE IF NOT EXISTS {db}.{local} {lay.on_cluster()} (
    `time` DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    `revision` UInt64 CODEC(T64, ZSTD(1)),
    `who` LowCardinality(String) CODEC(ZSTD(1)),
    `kind` LowCardinality(String) CODEC(ZSTD(1)),
    `name` LowCardinality(String) CODEC(ZSTD(1)),
    `service` LowCardinality(String) CODEC(ZSTD(1)),
    `action` LowCardinality(String) CODEC(ZSTD(1)),
    `from_mode` LowCardinality(String) CODEC(ZSTD(1)),
    `to_mode` LowCardinality(String) CODEC(ZSTD(1)),
    `before` String CODEC(ZSTD(1)),
    `after` String CODEC(ZSTD(1)),
    `reason` String CODEC(ZSTD(1)),
    `control_id` LowCardinality(String) CODEC(ZSTD(1))
) ENGINE = {lay.engine('ReplacingMergeTree')}
PARTITION BY toYYYYMM(time)
ORDER BY (revision, kind, name, time)
{changes_ttl(lay.retention.changes_days)}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000"""]
    if lay.cluster:
        # Sharded by revision: the copies of a change meet on one shard, where FINAL folds them.
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {db}.`mesh_changes` {lay.on_cluster()} AS {db}.{local} "
            f"ENGINE = Distributed({quote_ident(lay.cluster)}, {db}, {local}, revision)"
        )
    return stmts


def add_columns(lay: Layout, table: str, columns: Sequence[tuple[str, str, str]], after: str = "") -> list[str]:
    """The statements of a migration adding (name, type, codec) columns to `table`, written out literally.

    ADD COLUMN IF NOT EXISTS: a database that already has them is unchanged. The first
    new column goes AFTER `after` (the end when ''), the next ones after each other, so
    a database upgraded by ALTER keeps the order a fresh one gets. On a cluster the
    Distributed table gets the columns too (without a codec: it stores nothing).
    """
    db = quote_ident(lay.database)

    def alter(name: str, with_codec: bool) -> str:
        adds, previous = [], after
        for column, sql_type, codec in columns:
            add = f"ADD COLUMN IF NOT EXISTS {quote_ident(column)} {sql_type}"
            if with_codec and codec:
                add += f" {codec}"
            if previous:
                add += f" AFTER {quote_ident(previous)}"
                previous = column
            adds.append(add)
        return " ".join(filter(None, ["ALTER TABLE", f"{db}.{quote_ident(name)}", lay.on_cluster(), ", ".join(adds)]))

    stmts = [alter(lay.local(table), True)]
    if lay.cluster:
        stmts.append(alter(table, False))
    return stmts


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change: its version (1, 2, ...), what it does in a few words, and its statements."""

    version: int
    name: str
    statements: list[str]


def migrations(lay: Layout) -> list[Migration]:
    """Every schema change ever made, oldest first. Append; never edit or reorder one already released."""
    return [
        Migration(1, "create calls", _v1_create_calls(lay)),
        Migration(2, "create otel_traces, trace id lookup and its view", _v2_create_traces(lay)),
        Migration(3, "add calls.response_flags", add_columns(
            lay, "calls", [("response_flags", "LowCardinality(String)", "CODEC(ZSTD(1))")], after="error")),
        Migration(4, "create mesh_changes", _v4_create_mesh_changes(lay)),
    ]


def bootstrap_ddl(lay: Layout) -> list[str]:
    db = quote_ident(lay.database)
    return [
        f"CREATE DATABASE IF NOT EXISTS {db} {lay.on_cluster()}",
        f"""CREATE TABLE IF NOT EXISTS {db}.`{MIGRATIONS_TABLE}` {lay.on_cluster()} (
    version UInt32,
    name String,
    applied_at DateTime64(3)
) ENGINE = {lay.engine('ReplacingMergeTree')}
ORDER BY version""",
    ]


def full_ddl(lay: Layout) -> list[str]:
    """Every statement that builds the schema from nothing, in order (for `meshlens schema`)."""
    return bootstrap_ddl(lay) + [s for m in migrations(lay) for s in m.statements]


class Executes(Protocol):
    def command(self, sql: str, settings: dict | None = None) -> None: ...
    def query_rows(self, sql: str) -> list[tuple]: ...
    def use_database(self) -> None: ...


def migrate(store: Executes, lay: Layout, history: Sequence[Migration] | None = None) -> list[int]:
    """Apply the migrations this database has not seen yet; return their versions.

    `history` is the list to bring the database to, `migrations(lay)` unless given
    (tests give a prefix of it, to build a database as an older release left it).
    """
    for stmt in bootstrap_ddl(lay):
        store.command(stmt)
    db = quote_ident(lay.database)
    rows = store.query_rows(f"SELECT max(version) FROM {db}.`{MIGRATIONS_TABLE}`")
    current = int(rows[0][0] or 0) if rows else 0
    applied = []
    for m in migrations(lay) if history is None else history:
        if m.version <= current:
            continue
        for stmt in m.statements:
            store.command(stmt)
        name = m.name.replace("\\", "\\\\").replace("'", "\\'")
        # INSERT ... SELECT, not VALUES: over the native protocol the server does not
        # parse inline VALUES but waits for data blocks the client never sends.
        store.command(
            f"INSERT INTO {db}.`{MIGRATIONS_TABLE}` (version, name, applied_at) "
            f"SELECT {m.version}, '{name}', now64(3)"
        )
        applied.append(m.version)
    apply_retention(store, lay)
    store.use_database()
    return applied


def apply_retention(store: Executes, lay: Layout) -> None:
    """Make each table's TTL match the configured retention, without rewriting old parts."""
    db = quote_ident(lay.database)
    wanted = {
        lay.local("calls"): calls_ttl(lay.retention.calls_days),
        lay.local("otel_traces"): traces_ttl(lay.retention.traces_days),
        lay.local("otel_traces_trace_id_ts"): trace_id_ts_ttl(lay.retention.traces_days),
        lay.local("mesh_changes"): changes_ttl(lay.retention.changes_days),
    }
    names = ", ".join(f"'{n}'" for n in wanted)
    rows = store.query_rows(
        f"SELECT name, engine_full FROM system.tables WHERE database = '{lay.database}' AND name IN ({names})"
    )
    for name, engine_full in rows:
        ttl = wanted[name]
        has = re.search(r"\bTTL (.*?) SETTINGS", engine_full)
        current = f"TTL {has.group(1).strip()}" if has else ""
        if _normal(current) == _normal(ttl):
            continue
        if ttl:
            stmt = f"ALTER TABLE {db}.{quote_ident(name)} {lay.on_cluster()} MODIFY {ttl}"
        else:
            stmt = f"ALTER TABLE {db}.{quote_ident(name)} {lay.on_cluster()} REMOVE TTL"
        store.command(stmt, {"materialize_ttl_after_modify": 0} if ttl else None)


def _normal(ttl: str) -> str:
    return re.sub(r"\s+", "", ttl)

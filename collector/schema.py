"""The ClickHouse schema: `calls`, `otel_traces` and its trace-id lookup, as versioned migrations.

`otel_traces`, `otel_traces_trace_id_ts` and `otel_traces_trace_id_ts_mv`
follow the OpenTelemetry Collector ClickHouse exporter's layout column for
column (types, codecs, skip indexes, partitioning, ORDER BY, TTL), so Grafana's
ClickHouse plugin and existing OTel tooling read them unchanged.

Migrations are forward-only and recorded in `meshlens_schema_migrations`;
each statement is idempotent (IF NOT EXISTS), so two collectors starting at once
are harmless. Retention (TTL) is not a migration: it is configuration, applied
with ALTER ... MODIFY TTL whenever it differs from what the table has.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from meshlens.collector.record import CALL_COLUMNS
from meshlens.collector.stores.base import quote_ident

# Rows a plain MergeTree remembers insert_deduplication_token for. A replayed
# spool segment is at most a few hundred batches behind; 10,000 is generous.
DEDUP_WINDOW = 10_000

MIGRATIONS_TABLE = "meshlens_schema_migrations"


@dataclass(frozen=True, slots=True)
class Retention:
    """Days of data kept per table; 0 keeps data forever."""

    calls_days: int = 30
    traces_days: int = 7


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


def _calls_ddl(lay: Layout) -> list[str]:
    db = quote_ident(lay.database)
    cols = ",\n    ".join(f"`{c.name}` {c.sql_type} {c.codec}" for c in CALL_COLUMNS)
    local = quote_ident(lay.local("calls"))
    stmts = [f"""CREATE TABLE IF NOT EXISTS {db}.{local} {lay.on_cluster()} (
    {cols},
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_src_service src_service TYPE set(0) GRANULARITY 1,
    INDEX idx_duration duration_ns TYPE minmax GRANULARITY 1,
    INDEX idx_status status TYPE minmax GRANULARITY 1
) ENGINE = {lay.engine()}
PARTITION BY toDate(time)
PRIMARY KEY (dst_service, toStartOfHour(time))
ORDER BY (dst_service, toStartOfHour(time), src_service, observer, time)
{calls_ttl(lay.retention.calls_days)}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = {DEDUP_WINDOW}"""]
    if lay.cluster:
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {db}.`calls` {lay.on_cluster()} AS {db}.{local} "
            f"ENGINE = Distributed({quote_ident(lay.cluster)}, {db}, {local}, rand())"
        )
    return stmts


def _traces_ddl(lay: Layout) -> list[str]:
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
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1, non_replicated_deduplication_window = {DEDUP_WINDOW}""",
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


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: list[str]


def migrations(lay: Layout) -> list[Migration]:
    """Every schema change ever made, oldest first. Append; never edit or reorder."""
    return [
        Migration(1, "create calls", _calls_ddl(lay)),
        Migration(2, "create otel_traces, trace id lookup and its view", _traces_ddl(lay)),
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


def migrate(store: Executes, lay: Layout) -> list[int]:
    """Apply the migrations this database has not seen yet; return their versions."""
    for stmt in bootstrap_ddl(lay):
        store.command(stmt)
    db = quote_ident(lay.database)
    rows = store.query_rows(f"SELECT max(version) FROM {db}.`{MIGRATIONS_TABLE}`")
    current = int(rows[0][0] or 0) if rows else 0
    applied = []
    for m in migrations(lay):
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

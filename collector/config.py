"""The collector's settings: typed, with a default for each that works on one laptop."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_store_url() -> str:
    # Imported when needed: collector.stores brings pyarrow (~40 MB), and every `meshlens`
    # subcommand (the sidecar too) builds its flags from this module.
    from meshlens.collector.stores import default_store_url
    return default_store_url()


# The OpenTelemetry Collector's confighttp default max_request_body_size is 20 MiB;
# the same bound applies after gzip is undone, so a small bomb cannot blow up memory.
MAX_BODY_BYTES = 20 * 1024 * 1024
# Read queries the query endpoint runs at once; one more gets ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES.
# ClickHouse's documented example is 100 for a whole server (its default is now unlimited);
# the embedded store shares the collector's process, memory and cores with ingestion, so
# far fewer, yet enough for a dashboard's panels refreshing together.
MAX_CONCURRENT_QUERIES = 16
# Spans held for --forward-otlp: a minute of 1,000 spans/s, so a receiver's restart loses
# nothing; ~0.5 KB a span in Arrow (SDK spans of ten attributes), ~30 MB full.
FORWARD_QUEUE_SPANS = 60_000
# The OpenTelemetry exporters' default timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s).
FORWARD_TIMEOUT_S = 10.0


def default_spool_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return str(Path(base) / "meshlens" / "spool")


@dataclass
class CollectorConfig:
    """Settings of `meshlens collector` (flags > MESHLENS_* environment > --config file)."""

    store: str = field(default_factory=_default_store_url, metadata={"help": "store URL: chdb:PATH, clickhouse://…, http://…"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the OTLP and call-batch listeners bind"})
    otlp_http_port: int = field(default=4318, metadata={"help": "OTLP/HTTP and /v1/calls port"})
    otlp_grpc_port: int = field(default=4317, metadata={"help": "OTLP/gRPC port"})
    query_host: str = field(default="127.0.0.1", metadata={"help": "address of the ClickHouse HTTP query endpoint (embedded store only)"})
    query_port: int = field(default=8123, metadata={"help": "port of the query endpoint; 0 picks a free one, -1 disables it"})
    query_user: str = field(default="", metadata={"help": "basic-auth user for the query endpoint ('' = no auth)"})
    query_password: str = field(default="", metadata={"help": "basic-auth password for the query endpoint"})
    query_max_concurrent: int = field(default=MAX_CONCURRENT_QUERIES, metadata={"help": "read queries the query endpoint runs at once; one more is refused with ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES (202)"})
    spool_dir: str = field(default_factory=default_spool_dir, metadata={"help": "where accepted batches wait for the store"})
    spool_max_bytes: int = field(default=1 << 30, metadata={"help": "spool size limit; beyond it producers get 503"})
    batch_rows: int = field(default=50_000, metadata={"help": "rows per insert (a batch is also cut every flush interval)"})
    flush_interval: float = field(default=1.0, metadata={"help": "seconds before a partial batch is inserted"})
    max_backlog_bytes: int = field(default=256 << 20, metadata={"help": "backlog at which producers get 429 while the store is up"})
    max_body_bytes: int = field(default=MAX_BODY_BYTES, metadata={"help": "largest request body, before and after gzip"})
    calls_retention_days: int = field(default=30, metadata={"help": "days of calls kept (0 = forever)"})
    traces_retention_days: int = field(default=7, metadata={"help": "days of spans kept (0 = forever)"})
    changes_retention_days: int = field(default=365, metadata={"help": "days of the control plane's changes "
                                                                        "(mesh_changes) kept (0 = forever)"})
    forward_otlp: str = field(default="", metadata={"help": "also send every accepted span by OTLP/HTTP to this "
                                                            "endpoint (http://host:4318, or a URL ending in "
                                                            "/v1/traces); '' = off"})
    forward_queue_spans: int = field(default=FORWARD_QUEUE_SPANS, metadata={
        "help": "spans held for the forward endpoint; beyond it new spans are dropped and counted, "
                "ingestion never waits"})
    forward_timeout: float = field(default=FORWARD_TIMEOUT_S, metadata={
        "help": "seconds one request to the forward endpoint may take before it is retried"})

    def validate(self) -> None:
        for name in ("otlp_http_port", "otlp_grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {getattr(self, name)}")
        if not -1 <= self.query_port <= 65535:
            raise ValueError(f"query_port must be -1..65535, got {self.query_port}")
        for name in ("spool_max_bytes", "batch_rows", "max_backlog_bytes", "max_body_bytes", "query_max_concurrent",
                     "forward_queue_spans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("flush_interval", "forward_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.forward_otlp:
            from meshlens.collector.forward import traces_url  # protobuf and pyarrow: only when forwarding

            traces_url(self.forward_otlp)
        for name in ("calls_retention_days", "traces_retention_days", "changes_retention_days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")

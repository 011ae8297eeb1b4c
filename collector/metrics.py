"""The collector's Prometheus metrics (one registry per collector, served on /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("meshlens_collector_requests_total", "Ingest requests by endpoint and answer.",
                                ["endpoint", "code"], registry=r)
        self.rows_received = Counter("meshlens_collector_rows_received_total",
                                     "Rows accepted into the spool, by table.", ["table"], registry=r)
        self.batches_received = Counter("meshlens_collector_batches_received_total",
                                        "Requests accepted into the spool, by endpoint.", ["endpoint"], registry=r)
        self.rows_inserted = Counter("meshlens_collector_rows_inserted_total",
                                     "Rows written to the store, by table.", ["table"], registry=r)
        self.batches_inserted = Counter("meshlens_collector_batches_inserted_total",
                                        "Inserts into the store, by table.", ["table"], registry=r)
        self.insert_seconds = Histogram("meshlens_collector_insert_duration_seconds",
                                        "Time of one insert into the store.", ["table"], registry=r,
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.insert_errors = Counter("meshlens_collector_insert_errors_total",
                                     "Failed inserts, by kind (unavailable, refused).", ["kind"], registry=r)
        self.rejected_spans = Counter("meshlens_collector_rejected_spans_total",
                                      "Spans refused one by one (missing or invalid ids).", registry=r)
        self.duplicate_batches = Counter("meshlens_collector_duplicate_batches_total",
                                         "Call batches and changes whose id was already accepted: answered 200, "
                                         "not stored again.",
                                         registry=r)
        self.rejected = Counter("meshlens_collector_rejected_requests_total",
                                "Requests refused whole, by reason.", ["reason"], registry=r)
        self.dropped_rows = Counter("meshlens_collector_dropped_rows_total",
                                    "Rows accepted but not stored, by reason (quarantined segments).",
                                    ["reason"], registry=r)
        self.spool_bytes = Gauge("meshlens_collector_spool_bytes", "Bytes in the spool not yet in the store.",
                                 registry=r)
        self.spool_segments = Gauge("meshlens_collector_spool_segments",
                                    "Sealed segments waiting for the store.", registry=r)
        self.spool_errors = Counter("meshlens_collector_spool_errors_total",
                                    "Writes the spool refused (limit reached or disk full).", registry=r)
        self.store_up = Gauge("meshlens_collector_store_up", "1 while the last insert succeeded.", registry=r)
        # --forward-otlp (collector/forward.py); all 0 when forwarding is off
        self.forward_spans = Counter("meshlens_collector_forward_spans_total",
                                     "Spans the forward endpoint took.", registry=r)
        self.forward_batches = Counter("meshlens_collector_forward_batches_total",
                                       "Export requests the forward endpoint answered 200.", registry=r)
        self.forward_retries = Counter("meshlens_collector_forward_retries_total",
                                       "Export requests to be sent again, by what came back (429, 502, 503, "
                                       "504, unreachable).", ["reason"], registry=r)
        self.forward_dropped = Counter("meshlens_collector_forward_dropped_spans_total",
                                       "Accepted spans never forwarded, by reason (queue_full, rejected, invalid, "
                                       "shutdown, error).", ["reason"], registry=r)
        self.forward_queue_spans = Gauge("meshlens_collector_forward_queue_spans",
                                         "Spans waiting for the forward endpoint, the batch being sent included.",
                                         registry=r)

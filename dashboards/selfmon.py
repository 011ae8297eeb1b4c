"""The meshlens-itself dashboard: collector ingest, drops, spool and sidecar recorders, from Prometheus.

The metric names are the ones collector/metrics.py and proxy/metrics.py (+
proxy/admin.py's recorder gauges) export; tests/dashboards/test_promql.py
checks each against a real collector's and a real proxy's /metrics.
"""
from __future__ import annotations

from typing import Any

from meshlens.dashboards.model import Panel, Row, dashboard, datasource_var, prom_target

RATE = "[$__rate_interval]"


def graph(title: str, targets: list[tuple[str, str]], unit: str = "", description: str = "", w: int = 8,
          stack: bool = False) -> Panel:
    refs = "ABCDEFGH"
    custom = {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
              "stacking": {"group": "A", "mode": "normal" if stack else "none"}}
    return Panel(title, "timeseries", [prom_target(e, legend, refs[i]) for i, (e, legend) in enumerate(targets)],
                 description, w=w, unit=unit, custom=custom,
                 options={"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}})


def single(title: str, expr: str, unit: str = "", description: str = "", w: int = 6) -> Panel:
    return Panel(title, "stat", [prom_target(expr)], description, w=w, h=4, unit=unit,
                 options={"reduceOptions": {"values": False, "calcs": ["lastNotNull"], "fields": ""},
                          "colorMode": "value", "graphMode": "area", "textMode": "auto"})


def selfmon() -> dict[str, Any]:
    items: list[Panel | Row] = [
        Row("Collector"),
        single("Store up", "min(meshlens_collector_store_up)", description="1 while the last insert succeeded."),
        single("Spool backlog", "sum(meshlens_collector_spool_bytes)", unit="bytes",
               description="Bytes accepted but not yet in the store."),
        single("Rows dropped (range)", "sum(increase(meshlens_collector_dropped_rows_total[$__range])) or vector(0)",
               description="Accepted rows that never reached the store (quarantined spool segments)."),
        single("Sidecar calls dropped (range)",
               "sum(increase(meshlens_recorder_dropped_total[$__range])) or vector(0)",
               description="Calls sidecars could not ship to the collector (buffer full, collector unavailable, "
                           "rejected). Application traffic is never slowed for telemetry."),
        graph("Rows received per second", [(f"sum by (table) (rate(meshlens_collector_rows_received_total{RATE}))",
                                            "{{table}}")], unit="rowsps"),
        graph("Rows inserted per second", [(f"sum by (table) (rate(meshlens_collector_rows_inserted_total{RATE}))",
                                            "{{table}}")], unit="rowsps"),
        graph("Ingest requests", [(f"sum by (endpoint, code) (rate(meshlens_collector_requests_total{RATE}))",
                                   "{{endpoint}} {{code}}")], unit="reqps"),
        graph("Insert latency p95", [(
            "histogram_quantile(0.95, sum by (le, table) "
            f"(rate(meshlens_collector_insert_duration_seconds_bucket{RATE})))",
            "{{table}}")], unit="s"),
        graph("Refused and failed", [
            (f"sum by (reason) (rate(meshlens_collector_rejected_requests_total{RATE}))", "rejected {{reason}}"),
            (f"sum(rate(meshlens_collector_rejected_spans_total{RATE}))", "rejected spans"),
            (f"sum by (kind) (rate(meshlens_collector_insert_errors_total{RATE}))", "insert error {{kind}}"),
            (f"sum(rate(meshlens_collector_spool_errors_total{RATE}))", "spool write refused"),
        ], unit="ops"),
        graph("Drops", [(f"sum by (reason) (rate(meshlens_collector_dropped_rows_total{RATE}))", "{{reason}}")],
              unit="rowsps"),
        graph("Spool", [("sum(meshlens_collector_spool_bytes)", "bytes"),
                        ("sum(meshlens_collector_spool_segments)", "segments")], w=8),
        graph("Batches", [(f"sum by (endpoint) (rate(meshlens_collector_batches_received_total{RATE}))",
                           "received {{endpoint}}"),
                          (f"sum by (table) (rate(meshlens_collector_batches_inserted_total{RATE}))",
                           "inserted {{table}}")], unit="ops"),
        Row("Sidecars"),
        graph("Recorder drops by reason", [(f"sum by (reason) (rate(meshlens_recorder_dropped_total{RATE}))",
                                            "{{reason}}")], unit="ops", stack=True),
        graph("Recorder buffer", [("sum by (instance) (meshlens_recorder_buffered)", "{{instance}}")],
              description="Calls waiting in each sidecar's buffer to be shipped."),
        graph("Sidecar requests", [(f"sum by (reporter, destination_service) (rate(meshlens_requests_total{RATE}))",
                                    "{{reporter}} -> {{destination_service}}")], unit="reqps"),
        graph("Sidecar p99 latency", [(
            "histogram_quantile(0.99, sum by (le, destination_service) "
            f"(rate(meshlens_request_duration_milliseconds_bucket{{reporter=\"source\"}}{RATE})))",
            "{{destination_service}}")], unit="ms"),
        graph("Open downstream connections", [("sum by (instance) (meshlens_downstream_cx_active)", "{{instance}}")]),
    ]
    prometheus = datasource_var("prometheus", "prometheus", "Prometheus")
    return dashboard("meshlens-self", "meshlens / meshlens itself",
                     "The pipeline's own health: collector ingest, inserts, refusals, drops and spool; sidecar "
                     "recorders and their drops. Prometheus metrics scraped from collectors (/metrics) and "
                     "sidecars (:15090/stats/prometheus).", [prometheus], items)

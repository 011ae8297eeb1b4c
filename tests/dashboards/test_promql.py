"""Every metric the meshlens-itself dashboard queries is exported by a real collector or a real sidecar."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlens.dashboards import load_all
from tests.collector_process import CollectorProcess
from tests.dashboards.runner import panels
from tests.proxy.processes import ProxyProcess, SampleService

SELF = load_all()["meshlens-self"]
METRIC = re.compile(r"\bmeshlens_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def dashboard_metrics() -> set[str]:
    return {m for p in panels(SELF) for t in p.get("targets", []) for m in METRIC.findall(t.get("expr", ""))}


def exported(text: str) -> set[str]:
    """Metric names a scrape can return: every sample name, and each family's names by type."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        names |= {fam.name + s for s in SUFFIXES.get(fam.type, ("",))}
    return names


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("promql")
    col = CollectorProcess(tmp / "collector").start()
    app = SampleService().start()
    proxy = None
    try:
        proxy = ProxyProcess(tmp / "proxy", json.dumps({"services": {"backend": {}}}), "backend",
                             "--app-port", str(app.port), "--collector", f"{col.base}/v1/calls").start()
        assert get(f"http://127.0.0.1:{proxy.inbound}/hello") == "hello\n"
        yield {"collector": get(f"{col.base}/metrics"),
               "proxy": get(f"http://127.0.0.1:{proxy.ports['metrics']}/stats/prometheus")}
    finally:
        if proxy is not None:
            proxy.stop()
            proxy.kill()
        app.stop()
        col.stop()
        col.kill()


def test_the_dashboard_queries_metrics(scrapes: dict[str, str]) -> None:
    names = dashboard_metrics()
    assert {"meshlens_collector_rows_received_total", "meshlens_recorder_dropped_total",
            "meshlens_collector_spool_bytes"} <= names


def test_every_metric_is_exported(scrapes: dict[str, str]) -> None:
    available = exported(scrapes["collector"]) | exported(scrapes["proxy"])
    missing = sorted(dashboard_metrics() - available)
    assert not missing, f"not exported by a collector or a sidecar: {missing}"


def test_sidecar_recorder_drops_come_from_the_sidecar(scrapes: dict[str, str]) -> None:
    proxy = exported(scrapes["proxy"])
    assert {"meshlens_recorder_dropped_total", "meshlens_recorder_buffered", "meshlens_requests_total",
            "meshlens_request_duration_milliseconds_bucket", "meshlens_downstream_cx_active"} <= proxy
    reasons = {s.labels.get("reason") for f in text_string_to_metric_families(scrapes["proxy"]) for s in f.samples
               if s.name == "meshlens_recorder_dropped_total"}
    assert reasons == {"buffer_full", "collector_unavailable", "rejected"}

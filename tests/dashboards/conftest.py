"""A store with traffic for the dashboards: the demo's (fixture `demo_store`) when it exists, else our own.

Our own: a real `meshlens collector` subprocess fed calls (CallRecorder) and
OTLP spans (the OpenTelemetry SDK exporter); its query endpoint is the URL.
MESHLENS_TEST_DASHBOARDS_OWN_DATA=1 uses our own even when the demo fixture exists;
MESHLENS_TEST_DASHBOARDS_STORE=URL uses any store already serving traffic (a collector's query endpoint).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshlens.collector.stores import Store, connect
from tests.collector_process import CollectorProcess
from tests.dashboards.traffic import N_PER_EDGE, send_calls, send_spans
from tests.waiting import PATIENCE_S


@dataclass
class PanelStore:
    url: str
    store: Store
    source: str


def _wait_rows(store: Store, table: str, n: int, timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = int(store.query_rows(f"SELECT count() FROM meshlens.{table}")[0][0])
        if got >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{table}: {got} rows of {n} after {timeout}s")


@pytest.fixture(scope="session")
def panel_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelStore]:
    if os.environ.get("MESHLENS_TEST_DASHBOARDS_STORE"):
        url = os.environ["MESHLENS_TEST_DASHBOARDS_STORE"]
        store = connect(url)
        yield PanelStore(url, store, "given")
        store.close()
        return
    if not os.environ.get("MESHLENS_TEST_DASHBOARDS_OWN_DATA"):
        try:
            demo = request.getfixturevalue("demo_store")
        except pytest.FixtureLookupError:
            demo = None
        if demo is not None:
            store = connect(demo.url)
            yield PanelStore(demo.url, store, "demo")
            store.close()
            return
    collector = CollectorProcess(tmp_path_factory.mktemp("dashboards-collector"))
    with collector:
        sent = send_calls(collector.base)
        spans = send_spans(collector.base)
        store = connect(collector.query_url)
        _wait_rows(store, "calls", sent)
        _wait_rows(store, "otel_traces", spans)
        assert sent >= N_PER_EDGE
        yield PanelStore(collector.query_url, store, "own")
        store.close()

"""A store with traffic for the dashboards: the demo's (fixture `demo_store`) when it exists, else our own.

Our own (`own_store`): a real `meshlens collector` subprocess fed calls (CallRecorder),
OTLP spans (the OpenTelemetry SDK exporter) and the control plane's changes (POST
/v1/changes); its query endpoint is the URL. What needs every mode and
`mesh_changes` with known counts (the dry-run dashboard, the annotations) always runs on
our own: its exact figures are planned, the demo's are what its run made. One change reaches the table twice, as when a second
collector is shipped the same trail: readers must see it once.
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
from tests.dashboards.traffic import N_PER_EDGE, RESHIPPED, changes, send_calls, send_changes, send_spans
from tests.waiting import PATIENCE_S


@dataclass
class PanelStore:
    url: str
    store: Store
    source: str
    now_ns: int = 0
    """When our own traffic was made (its times are relative to it); 0 for the demo's or a given store."""


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
def panel_store(request: pytest.FixtureRequest) -> Iterator[PanelStore]:
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
    yield request.getfixturevalue("own_store")


@pytest.fixture(scope="session")
def own_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PanelStore]:
    """Our own traffic and changes, served by a collector over its store (see the module's docstring)."""
    workdir = tmp_path_factory.mktemp("dashboards-collector")
    now_ns = time.time_ns()
    trail = changes(now_ns)
    with CollectorProcess(workdir / "first", f"chdb:{workdir / 'store'}") as collector:
        sent = send_calls(collector.base, now_ns)
        spans = send_spans(collector.base)
        assert send_changes(collector.base, trail) == {"accepted": len(trail), "duplicates": 0}
        store = connect(collector.query_url)
        _wait_rows(store, "calls", sent)
        _wait_rows(store, "otel_traces", spans)
        _wait_rows(store, "mesh_changes", len(trail))
        store.close()
    assert sent >= N_PER_EDGE
    # A second collector over the same store, its spool new: it has not seen the change, and stores it again.
    with CollectorProcess(workdir / "second", f"chdb:{workdir / 'store'}") as collector:
        again = [c for c in trail if c["revision"] == RESHIPPED]
        assert send_changes(collector.base, again) == {"accepted": 1, "duplicates": 0}
        store = connect(collector.query_url)
        _wait_rows(store, "mesh_changes", len(trail) + 1)
        yield PanelStore(collector.query_url, store, "own", now_ns)
        store.close()

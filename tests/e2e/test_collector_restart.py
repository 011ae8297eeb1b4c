"""A collector killed with kill -9 for ten seconds under a paced load through two sidecars: no request fails,
and every call is stored exactly once from each side.

    wrk (16 connections, 1,000 req/s) -> sidecar A (web, outbound: observer=client)
                                      -> sidecar B (backend, inbound: observer=server) -> app
    both sidecars record into one collector, which is killed (-9) in the middle of the load and
    started again ten seconds later on the same port, spool and store.

What carries the outage: each sidecar keeps the batches the collector did not acknowledge (up to
MAX_UNSENT_CALLS) and resends them, under the same batch id, once it answers again; a batch the
collector had spooled when it died is answered as a duplicate instead of being stored twice.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.proxy.chain_app import ChainApp
from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess
from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S, wait_until

# The load: CONNECTIONS connections, each pausing DELAY_MS after every response (at most 1,000 requests a
# second in all), for LOAD_S seconds; then no connection starts another request, and wrk ends WRK_S
# seconds after it began, with nothing in flight: every request it counts is one the sidecars finished.
# LOAD_S covers the outage (its first records, KILL_AFTER_S, OUTAGE_S, the restart) with a few seconds to spare.
CONNECTIONS, DELAY_MS, LOAD_S, WRK_S = 16, 16, 20, 24
# Where the outage falls in the load and how long the collector stays dead: the scenario (the
# kill KILL_AFTER_S into the load, once records flow; back OUTAGE_S later), not waits for anything.
KILL_AFTER_S, OUTAGE_S = 4, 10
PACE = """
-- Every connection: a request, DELAY_MS after each response the next; none after LOAD_S seconds.
wrk.headers["Host"] = "backend"
local stop_at = nil
function delay()
  stop_at = stop_at or os.time() + {load_s}
  if os.time() >= stop_at then return 3600 * 1000 end
  return {delay_ms}
end
"""


def stored(col: CollectorProcess) -> dict[str, tuple[int, int]]:
    """observer -> (calls to /call, distinct x-request-ids among them, '' not counted)."""
    store = connect(col.query_url)
    try:
        rows = store.query_rows("SELECT observer, count(), uniqExactIf(attributes['x_request_id'], "
                                "attributes['x_request_id'] != '') FROM meshlens.calls WHERE path = '/call' "
                                "GROUP BY observer")
    finally:
        store.close()
    return {observer: (int(n), int(unique)) for observer, n, unique in rows}


def spool_bytes(col: CollectorProcess) -> int:
    with urllib.request.urlopen(f"{col.base}/healthz", timeout=PATIENCE_S) as resp:
        return json.loads(resp.read())["spool_bytes"]  # the live depth, the open segment included


def recorder_stats(sidecar: ProxyProcess) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.ports['admin']}/stats", timeout=PATIENCE_S) as resp:
        return {k: v for k, v in json.loads(resp.read()).items() if k.startswith("recorder_")}


def test_a_collector_killed_for_ten_seconds_loses_and_duplicates_no_call(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: run scripts/install-system.sh")
    port = free_port()  # the collector's, before and after the kill: the sidecars' --collector names it
    url = f"http://127.0.0.1:{port}/v1/calls"
    started: list[ServerProcess] = []
    wrk = None
    try:
        col = CollectorProcess(tmp_path / "collector", None, "--otlp-http-port", str(port))
        started.append(col)
        col.start()
        app = ChainApp(tmp_path / "app", "backend")
        started.append(app)
        app.start()
        b = ProxyProcess(tmp_path / "b", json.dumps({"services": {"backend": {}}}), "backend",
                         "--app-port", str(app.port), "--collector", url)
        started.append(b)
        b.start()
        a = ProxyProcess(tmp_path / "a", json.dumps({"services": {"web": {}, "backend": {
            "instances": [f"127.0.0.1:{b.inbound}"]}}}), "web", "--collector", url)
        started.append(a)
        a.start()
        pace = tmp_path / "pace.lua"
        pace.write_text(PACE.format(load_s=LOAD_S, delay_ms=DELAY_MS))
        # --timeout: wrk's 2 s default would count a slow answer on a busy machine as a failure
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{WRK_S}s", f"--timeout={WRK_S}s",
                                "-s", str(pace), f"http://127.0.0.1:{a.outbound}/call"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # the load runs and both sides' records arrive; then the collector dies wherever it is
        wait_until(lambda: set(stored(col)) == {"client", "server"}, "records from both sidecars")
        time.sleep(KILL_AFTER_S)
        col.kill()  # SIGKILL
        time.sleep(OUTAGE_S)
        col = CollectorProcess(tmp_path / "collector", None, "--otlp-http-port", str(port))  # same spool, same store
        started.append(col)
        col.start()
        out, _ = wrk.communicate(timeout=WRK_S + PATIENCE_S)

        assert wrk.returncode == 0, out
        assert "Socket errors" not in out and "Non-2xx" not in out, out  # no request failed, outage or not
        done = int(re.search(r"(\d+) requests in", out).group(1))
        assert done > CONNECTIONS, out
        wait_until(lambda: (lambda got: len(got) == 2 and all(n >= done for n, _ in got.values()))(stored(col)),
                   f"{done} calls from each sidecar")
        for sidecar in (a, b):
            dropped = {k: v for k, v in recorder_stats(sidecar).items() if k.startswith("recorder_dropped_")}
            assert dropped and not any(dropped.values()), dropped  # the outage was carried, not dropped
            assert sidecar.stop() == 0, sidecar.log.read_text()[-2000:]  # drains and flushes its recorder
        wait_until(lambda: spool_bytes(col) == 0, "an empty spool")  # whatever was sent is stored now

        # each request once from each side: as many as wrk completed, no x-request-id twice
        assert stored(col) == {"client": (done, done), "server": (done, done)}
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.communicate()
        for p in reversed(started):
            p.stop()
            p.kill()

"""The loop closed with real parts: calls observed by real sidecars, `meshlens recommend --apply` storing the
recommended retry in the control plane and putting the service in dry-run, the caller's sidecar applying it
(its own rule, by sourceLabels) and recording `would_retry`, and `meshlens dryrun report` saying what enforcing
would change, against the what-if stored with the policy. Paced loads; every step waits on counts of calls."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.control.test_control_cli import cli, http
from tests.control.test_guard import Api
from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess
from tests.proxy.test_policies import apply, config, follow
from tests.proxy.test_rotation import PacedLoad
from tests.waiting import wait_until

FAIL_EVERY = 10   # api answers every 10th request 503 at once: transient, independent failures
OBSERVED = 700    # calls in observe before recommending: past the retry analysis' minimum (500 on the route)
DRY_RUN = 200     # calls in dry-run before reporting


class BriskLoad(PacedLoad):
    """One request at a time, 5 ms apart: the counts above sooner than at PacedLoad's 20 ms."""

    PACE_S = 0.005


@pytest.fixture
def world(tmp_path: Path):
    collector = CollectorProcess(tmp_path / "collector").start()
    app = Api(delay_s=0.002, fail_every=FAIL_EVERY).start()
    control = ControlProcess(tmp_path / "control", 0, None, "--calls-store", collector.query_url).start()
    proxies: list[ProxyProcess] = []
    try:
        inbound = free_port()
        revision = apply(control, tmp_path, json.dumps({"services": {
            "web": {}, "api": {"instances": [f"127.0.0.1:{inbound}"]}}}))
        record = ("--collector", f"{collector.base}/v1/calls")
        for service, extra in (("api", ("--app-port", str(app.port), "--inbound-port", str(inbound))), ("web", ())):
            proxies.append(ProxyProcess(tmp_path / service, None, service, *record, *extra,
                                        control=control.url).start())
        for p in proxies:
            follow(p, revision)
        yield collector, control, proxies[1]
    finally:
        for p in reversed(proxies):
            p.stop()
        control.stop()
        app.stop()
        collector.stop()


def calls(collector: CollectorProcess, where: str) -> int:
    from meshlens.collector.stores import connect

    store = connect(collector.query_url)
    try:
        return store.query_rows(f"SELECT count() FROM meshlens.calls WHERE dst_service = 'api' AND "
                                f"observer = 'client' AND {where}")[0][0]
    finally:
        store.close()


def test_recommend_apply_then_dry_run_then_the_report(world):
    collector, control, web = world
    store = ("--store", collector.query_url)
    with BriskLoad(web.outbound) as load:
        wait_until(lambda: calls(collector, "mode = 'observe'") >= OBSERVED, f"{OBSERVED} calls in observe", poll=0.5,
                   timeout=300)
        out = cli(control, "recommend", *store, "--service", "api", "--apply", "--reason", "the loop")
        assert out.returncode == 0, out.stderr
        assert "api: VirtualService created" in out.stdout and "mode observe -> dry-run" in out.stdout
        vs = http(control, "GET", "/v1/resources/VirtualService/default/api")[1]["doc"]
        [rule, _] = vs["spec"]["http"]
        assert rule["match"][0]["sourceLabels"] == {"app": "web"} and rule["retries"]["attempts"] >= 1
        # web's sidecar applies api's dry-run with the rule that names it
        wait_until(lambda: config(web)["destinations"].get("api", {}).get("mode") == "dry-run",
                   "web's sidecar applying api's dry-run")
        wait_until(lambda: calls(collector, "mode = 'dry-run' AND action = 'would_retry'") >= DRY_RUN // FAIL_EVERY
                   and calls(collector, "mode = 'dry-run'") >= DRY_RUN, f"{DRY_RUN} calls in dry-run", timeout=300, poll=0.5)
    assert 0 < load.statuses.count(503) < len(load.statuses) // 5  # dry-run changed nothing the caller saw
    report = cli(control, "dryrun", "report", "api", *store, "--format", "json")
    assert report.returncode == 0, report.stderr
    r = json.loads(report.stdout)
    [retry] = [p for p in r["policies"] if p["word"] == "would_retry"]
    assert retry["n"] == retry["failed"] > 0 and retry["expected"]["transient_failures"] > 0
    assert r["estimated_enforce"]["failed"] < r["dry_run"]["failed"]  # retries would recover most of them
    assert r["observe"]["n"] >= OBSERVED
    assert any(f.startswith("would_retry agrees with the recommendation") for f in r["findings"]), r["findings"]
    text = cli(control, "dryrun", "report", "api", *store).stdout
    assert "enforced, callers would see fewer failures" in text

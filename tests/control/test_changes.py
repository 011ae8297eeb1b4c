"""The audit trail in the collector's mesh_changes, end to end: a real control plane shipping to a real collector
(up, down then started, restarted, refusing a change), and two replicas over one etcd shipping the same trail."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from meshlens.collector.stores import connect
from meshlens.control.changes import changes_url, service_of_change
from tests.clickhouse_server import free_port
from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.control.test_control_cli import MESH, cli, http
from tests.meshlens.policy.test_resources import EXAMPLE
from tests.waiting import wait_until

COLUMNS = "revision, kind, name, service, action, from_mode, to_mode, who, reason"


def query(col: CollectorProcess, sql: str) -> list[tuple]:
    store = connect(col.query_url)
    try:
        return store.query_rows(sql)
    finally:
        store.close()


def rows(col: CollectorProcess, columns: str = COLUMNS) -> list[tuple]:
    """mesh_changes as readers see it (FINAL: each change once), in revision order."""
    return query(col, f"SELECT {columns} FROM meshlens.mesh_changes FINAL ORDER BY revision, kind, name")


def copies(col: CollectorProcess) -> int:
    """Rows stored, copies of one change included (they fold only when parts merge, or with FINAL)."""
    return query(col, "SELECT count() FROM meshlens.mesh_changes")[0][0]


def collector_metric(col: CollectorProcess, name: str) -> float:
    with urllib.request.urlopen(f"{col.base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def history(control: ControlProcess) -> list[dict]:
    status, answer = http(control, "GET", "/v1/history?limit=1000")
    assert status == 200
    return answer["entries"]


def shipped(col: CollectorProcess, control: ControlProcess) -> list[tuple]:
    """Wait until mesh_changes holds every entry of the control plane's history; its rows."""
    want = len(history(control))
    return wait_until(lambda: got if len(got := rows(col)) >= want else None,
                      f"{want} changes in mesh_changes")


def keys(entries: list[dict]) -> list[tuple]:
    return [(e["revision"], e["kind"], e["name"], e["action"]) for e in entries]


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    mesh, example = tmp_path / "mesh.yaml", tmp_path / "payment.yaml"
    mesh.write_text(MESH)
    example.write_text(EXAMPLE)
    return str(mesh), str(example)


def ok(control: ControlProcess, *args: str) -> None:
    out = cli(control, *args)
    assert out.returncode == 0, out.stderr


def test_apply_mode_set_and_delete_become_rows_with_the_service_modes_documents_and_who(tmp_path, files):
    with CollectorProcess(tmp_path / "collector") as col, \
            ControlProcess(tmp_path / "control", 0, None, "--collector", col.base) as control:
        ok(control, "apply", "-f", files[0], "-f", files[1], "--reason", "the payment canary")
        ok(control, "mode", "set", "payment-service", "dry-run", "--reason", "try the retries")
        ok(control, "mode", "set", "payment-service", "enforce", "--reason", "dry-run agreed")
        ok(control, "delete", "vs", "production/payment-service", "--reason", "rolled back")
        entries = history(control)
        got = shipped(col, control)

        user = entries[0]["who"]
        assert got == [
            (1, "Mesh", "mesh", "", "created", "", "", user, "the payment canary"),
            (2, "VirtualService", "production/payment-service", "payment-service", "created", "", "", user,
             "the payment canary"),
            (3, "DestinationRule", "default/payment-service", "payment-service", "created", "", "", user,
             "the payment canary"),
            (4, "Mode", "payment-service", "payment-service", "created", "observe", "dry-run", user, "try the retries"),
            (5, "Mode", "payment-service", "payment-service", "configured", "dry-run", "enforce", user,
             "dry-run agreed"),
            (6, "VirtualService", "production/payment-service", "payment-service", "deleted", "", "", user,
             "rolled back"),
        ]
        assert keys(entries) == [r[:3] + (r[4],) for r in got]
        docs = rows(col, "revision, before, after, toUnixTimestamp64Nano(time), control_id")
        by_revision = {e["revision"]: e for e in entries}
        for revision, before, after, ns, control_id in docs:
            e = by_revision[revision]
            assert (json.loads(before) if before else None, json.loads(after) if after else None) == (
                e["before"], e["after"])
            assert ns == round(e["time"] * 1e9) and control_id.endswith(f":{control.port}")
        assert copies(col) == len(entries)


def test_changes_made_while_the_collector_is_down_are_shipped_once_in_order_when_it_starts(tmp_path, files):
    port = free_port()
    with ControlProcess(tmp_path / "control", 0, None, "--collector", f"http://127.0.0.1:{port}") as control:
        ok(control, "apply", "-f", files[0], "--reason", "first")
        for mode in ("dry-run", "enforce", "observe", "dry-run"):
            ok(control, "mode", "set", "web", mode, "--reason", f"to {mode}")
        with CollectorProcess(tmp_path / "collector", None, "--otlp-http-port", str(port)) as col:
            got = shipped(col, control)
            assert [r[:3] + (r[4],) for r in got] == keys(history(control))
            assert [(r[5], r[6]) for r in got[1:]] == [("observe", "dry-run"), ("dry-run", "enforce"),
                                                     ("enforce", "observe"), ("observe", "dry-run")]
            ok(control, "mode", "set", "web", "enforce", "--reason", "while it is up")  # and the next one, at once
            assert shipped(col, control)[-1][:7] == (6, "Mode", "web", "web", "configured", "dry-run", "enforce")
            assert copies(col) == 6
    assert "collector unavailable, changes wait" in control.log.read_text()


def test_a_restarted_control_plane_ships_what_it_had_not_and_nothing_twice(tmp_path, files):
    workdir = tmp_path / "control"
    with CollectorProcess(tmp_path / "collector") as col:
        with ControlProcess(workdir) as control:  # no collector yet: nothing shipped
            ok(control, "apply", "-f", files[0])
            ok(control, "mode", "set", "web", "dry-run", "--reason", "before shipping")
        with ControlProcess(workdir, 0, None, "--collector", col.base) as control:  # catches up at start
            assert len(shipped(col, control)) == 2
            ok(control, "mode", "set", "web", "enforce", "--reason", "shipped at once")
            assert len(shipped(col, control)) == 3
        with ControlProcess(workdir, 0, None, "--collector", col.base) as control:  # stopped cleanly: resumes
            ok(control, "mode", "set", "web", "observe", "--reason", "after a restart")
            assert len(shipped(col, control)) == 4
            ok(control, "mode", "set", "web", "enforce", "--reason", "just before a kill")
            assert len(shipped(col, control)) == 5
            control.kill()  # kill -9: where shipping stood is written seldom (ACK_WRITE_INTERVAL_S), maybe not since
        with sqlite3.connect(workdir / "control.db") as db:
            [(acked,)] = db.execute("SELECT revision FROM acknowledged").fetchall()
        assert 3 <= acked <= 5  # 3: written at the clean stop; 4: at this one's first catch-up
        with ControlProcess(workdir, 0, None, "--collector", col.base) as control:
            ok(control, "mode", "set", "web", "dry-run", "--reason", "after a kill")
            got = shipped(col, control)
            assert [r[:3] + (r[4],) for r in got] == keys(history(control)) and len(got) == 6
            assert copies(col) == 6  # what it shipped again was answered as a duplicate, not stored
            assert collector_metric(col, "meshlens_collector_duplicate_batches_total") >= 5 - acked


def test_a_change_the_collector_refuses_is_passed_over_and_the_ones_after_it_are_shipped(tmp_path, files):
    big = EXAMPLE.replace("beta-tester", "beta-tester-" + "x" * 6000)  # past the collector's body limit
    (tmp_path / "big.yaml").write_text(big)
    with CollectorProcess(tmp_path / "collector", None, "--max-body-bytes", "4096") as col, \
            ControlProcess(tmp_path / "control", 0, None, "--collector", col.base) as control:
        ok(control, "apply", "-f", files[0], "-f", str(tmp_path / "big.yaml"), "--reason", "one too big")
        ok(control, "mode", "set", "payment-service", "dry-run", "--reason", "after it")
        wait_until(lambda: len(rows(col)) >= 3, "the changes around the refused one")
        assert [r[:3] for r in rows(col)] == [(1, "Mesh", "mesh"), (3, "DestinationRule", "default/payment-service"),
                                              (4, "Mode", "payment-service")]
        log = wait_until(lambda: t if "collector refused a change" in (t := control.log.read_text()) else None,
                         "the refusal is logged")
        assert "revision=2 kind=VirtualService name=production/payment-service status=413" in log


def test_two_replicas_over_one_etcd_ship_the_same_trail_and_readers_see_each_change_once(tmp_path, files):
    from tests.control.etcd_cluster import EtcdCluster

    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        with CollectorProcess(tmp_path / "collector") as col, \
                ControlProcess(tmp_path / "a", 0, cluster.url, "--collector", col.base) as a, \
                ControlProcess(tmp_path / "b", 0, cluster.url, "--collector", col.base) as b:
            ok(a, "apply", "-f", files[0], "-f", files[1])  # one transaction: one revision for three resources
            ok(b, "mode", "set", "web", "dry-run", "--reason", "through b")
            ok(a, "mode", "set", "web", "enforce", "--reason", "through a")
            got = shipped(col, a)
            assert [r[:3] + (r[4],) for r in got] == keys(history(b)) and len(got) == 5
            assert len({r[0] for r in got[:3]}) == 1  # the apply's revision, shared
            assert copies(col) == 5  # the second replica's copies were answered as duplicates
            ids = {r[0] for r in rows(col, "control_id")}
            assert ids <= {f"{h}:{p}" for h in {i.rsplit(':', 1)[0] for i in ids} for p in (a.port, b.port)}
    finally:
        cluster.stop()


def test_a_collector_url_the_control_plane_cannot_ship_to_is_one_line_before_it_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    env["MESHLENS_COLLECTOR"] = "http://127.0.0.1:4318/v1/calls"  # the sidecars' endpoint, not this one's
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "control", "--port", "0", "--store",
                          f"sqlite:{tmp_path / 'c.db'}"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stderr == (
        "meshlens control: --collector: collector URL must be http://HOST:PORT (its OTLP/HTTP port, 4318) or end in "
        "/v1/changes, got 'http://127.0.0.1:4318/v1/calls'\n")


# -- the pieces, as transcripts ------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/changes"),
    ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/changes"),
    ("http://collector:4318/v1/changes", "http://collector:4318/v1/changes"),
    ("http://gw/meshlens/v1/changes", "http://gw/meshlens/v1/changes"),
])
def test_a_collector_url_names_its_changes_endpoint(url, expected):
    assert changes_url(url) == expected


@pytest.mark.parametrize("url", ["https://c:4318", "c:4318", "http://c:4318/v1/calls", "http://:4318", "http://c:x"])
def test_a_collector_url_that_names_no_changes_endpoint_is_refused_in_one_line(url):
    with pytest.raises(ValueError, match="collector URL") as err:
        changes_url(url)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, name, spec, service", [
    ("Mode", "web", {"mode": "dry-run"}, "web"),
    ("Guard", "web", {"service": "web"}, "web"),
    ("Mesh", "mesh", {"services": {"web": {}}}, ""),
    ("VirtualService", "production/pay", {"hosts": ["pay"]}, "pay"),
    ("VirtualService", "production/pay", {"hosts": ["pay.production.svc.cluster.local", "web.default", "pay"]},
     "pay,web"),
    ("VirtualService", "default/ext", {"hosts": ["api.example.com"]}, "api.example.com"),  # not a mesh service
    ("DestinationRule", "default/pay", {"host": "pay.prod"}, "pay"),
    ("LocalRateLimit", "pay", {"service": "payment-service"}, "payment-service"),
    ("LocalRateLimit", "pay", {}, "pay"),
    ("PeerAuthentication", "default/strict", {"selector": {"matchLabels": {"app": "pay"}}, "mtls": {}}, "pay"),
    ("AuthorizationPolicy", "default/all", {"action": "ALLOW"}, ""),
])
def test_the_service_a_change_is_about(kind, name, spec, service):
    assert service_of_change(kind, name, {"kind": kind, "spec": spec}) == service

"""Sidecars following the control plane: snapshots long-polled and applied without dropping a request,
ACK and NACK, the last snapshot kept on disk, the control plane away and back."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import pytest

from tests.control.processes import ControlProcess
from tests.control.test_control_cli import cli
from tests.proxy.processes import ProxyProcess, SampleService
from tests.waiting import wait_until


def mesh(*backends: int) -> str:
    return json.dumps({"services": {"web": {}, "backend": {"instances": [f"127.0.0.1:{p}" for p in backends]}}})


def get(url: str, host: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def config(proxy: ProxyProcess) -> dict:
    return json.loads(get(f"http://127.0.0.1:{proxy.ports['admin']}/config")[1])


def apply(control: ControlProcess, tmp_path, text: str) -> None:
    f = tmp_path / "mesh.json.yaml"
    f.write_text(text)
    out = cli(control, "apply", "-f", str(f), "--reason", "test")
    assert out.returncode == 0, out.stderr


@pytest.fixture
def apps():
    a, b = SampleService().start(), SampleService().start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def control(tmp_path):
    with ControlProcess(tmp_path / "control") as c:
        yield c


def sidecar(tmp_path, control_url: str, name: str = "web") -> ProxyProcess:
    return ProxyProcess(tmp_path / "proxy", None, name, "--no-record", control=control_url)


def test_a_sidecar_follows_the_mesh_without_dropping_the_request_in_flight(tmp_path, control, apps):
    a, b = apps
    apply(control, tmp_path, mesh(a.port))
    with sidecar(tmp_path, control.url).start() as proxy:
        out = f"http://127.0.0.1:{proxy.outbound}"
        assert get(out + "/hello", host="backend")[0] == 200
        held: list = []  # a request in flight at the moment the snapshot changes
        t = threading.Thread(target=lambda: held.append(get(out + "/hold", host="backend")))
        t.start()
        assert a.gate.arrived.wait(60)
        apply(control, tmp_path, mesh(b.port))  # backend moves to b
        wait_until(lambda: config(proxy)["services"]["backend"] == [f"127.0.0.1:{b.port}"], "the new mesh applied")
        a.gate.released.set()
        t.join(60)
        assert held and held[0][0] == 200  # finished on the connection it started on
        assert not b.gate.arrived.is_set()
        b.gate.released.set()
        assert get(out + "/hold", host="backend")[0] == 200 and b.gate.arrived.is_set()  # new requests go to b
        status = json.loads(cli(control, "status", "-o", "json").stdout)
        [s] = status["sidecars"]
        assert (s["service"], s["state"], s["applied_version"], s["error"]) == ("web", "ACK", str(status["revision"]), "")
        assert config(proxy)["control"]["state"] == "ACK"


def test_a_snapshot_the_sidecar_cannot_apply_is_refused_with_its_error_and_the_old_one_kept(tmp_path, control, apps):
    a, _ = apps
    apply(control, tmp_path, mesh(a.port))
    with sidecar(tmp_path, control.url).start() as proxy:
        before = config(proxy)["control"]["version"]
        apply(control, tmp_path, json.dumps({"services": {"backend": {"instances": [f"127.0.0.1:{a.port}"]}}}))
        s = wait_until(lambda: next((s for s in json.loads(cli(control, "status", "-o", "json").stdout)["sidecars"]
                                     if s["state"] == "NACK"), None), "the sidecar's NACK")
        assert s["error"].startswith("no service 'web' in the mesh") and s["applied_version"] == before
        assert config(proxy)["control"]["state"] == "NACK" and config(proxy)["control"]["version"] != before
        assert get(f"http://127.0.0.1:{proxy.outbound}/hello", host="backend")[0] == 200  # the old mesh still serves
        table = cli(control, "status").stdout
        assert "NACK" in table and "no service 'web' in the mesh" in table


def test_a_sidecar_restarted_while_the_control_plane_is_away_starts_from_its_last_snapshot(tmp_path, apps):
    a, b = apps
    control = ControlProcess(tmp_path / "control").start()
    try:
        apply(control, tmp_path, mesh(a.port))
        port = control.port
        with sidecar(tmp_path, control.url).start():
            pass
        assert control.stop() == 0
        control.kill()
        with sidecar(tmp_path, f"http://127.0.0.1:{port}").start() as proxy:  # nothing to ask: the disk answers
            assert config(proxy)["control"]["state"] == "cached"
            assert get(f"http://127.0.0.1:{proxy.outbound}/hello", host="backend")[0] == 200
            control = ControlProcess(tmp_path / "control", port).start()  # back, and a change made
            apply(control, tmp_path, mesh(b.port))
            wait_until(lambda: config(proxy)["services"]["backend"] == [f"127.0.0.1:{b.port}"] and
                       config(proxy)["control"]["state"] == "ACK", "the change, once the control plane is back")
            assert control.stop() == 0  # and away again: the sidecar keeps serving what it has
            control.kill()
            assert get(f"http://127.0.0.1:{proxy.outbound}/hello", host="backend")[0] == 200
    finally:
        control.stop()
        control.kill()


def test_a_sidecar_started_from_disk_acknowledges_once_the_control_plane_answers_even_unchanged(tmp_path, apps):
    control = ControlProcess(tmp_path / "control").start()
    try:
        apply(control, tmp_path, mesh(apps[0].port))
        port = control.port
        with sidecar(tmp_path, control.url).start():
            pass
        assert control.stop() == 0
        control.kill()
        with sidecar(tmp_path, f"http://127.0.0.1:{port}").start() as proxy:
            assert config(proxy)["control"]["state"] == "cached"
            control = ControlProcess(tmp_path / "control", port).start()  # back, nothing changed
            wait_until(lambda: config(proxy)["control"]["state"] == "ACK", "the ACK of the snapshot it runs on")
            [s] = [s for s in json.loads(cli(control, "status", "-o", "json").stdout)["sidecars"] if s["state"] == "ACK"]
            assert s["applied_version"] == config(proxy)["control"]["version"]
    finally:
        control.stop()
        control.kill()


def test_without_a_control_plane_or_a_kept_snapshot_a_sidecar_says_so_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "proxy", "--service", "web", "--control",
                          "http://127.0.0.1:9", "--snapshot-cache", str(tmp_path / "none.json"), "--no-record"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("meshlens proxy: cannot reach the control plane at http://127.0.0.1:9 (") and \
        f"no snapshot was kept at {tmp_path / 'none.json'}" in out.stderr


def test_a_service_the_control_planes_mesh_does_not_name_cannot_start(tmp_path, control, apps):
    apply(control, tmp_path, mesh(apps[0].port))
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "proxy", "--service", "ghost", "--control",
                          control.url, "--snapshot-cache", str(tmp_path / "s.json"), "--no-record"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no service 'ghost' in the mesh" in out.stderr and out.stderr.count("\n") == 1


def test_replicas_over_one_etcd_cluster_serve_one_mesh_and_a_change_reaches_every_sidecar(tmp_path, apps):
    from tests.control.etcd_cluster import EtcdCluster

    a, b = apps
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        with ControlProcess(tmp_path / "c1", store=cluster.url) as one, \
                ControlProcess(tmp_path / "c2", store=cluster.url) as two:
            apply(one, tmp_path, mesh(a.port))  # through one replica
            with sidecar(tmp_path, two.url).start() as proxy:  # following the other
                assert config(proxy)["services"]["backend"] == [f"127.0.0.1:{a.port}"]
                cluster.kill(cluster.names[0])  # a member down while the change is made
                apply(one, tmp_path, mesh(b.port))
                assert cli(one, "mode", "set", "web", "dry-run", "--reason", "x").returncode == 0
                wait_until(lambda: config(proxy)["services"]["backend"] == [f"127.0.0.1:{b.port}"] and
                           config(proxy)["control"]["desired_mode"] == "dry-run" and
                           config(proxy)["control"]["state"] == "ACK", "the change through the other replica")
                assert get(f"http://127.0.0.1:{proxy.outbound}/hello", host="backend")[0] == 200
                history = cli(two, "history", "-o", "json")
                assert [e["action"] for e in json.loads(history.stdout)] == ["created", "configured", "created"]
    finally:
        cluster.stop()

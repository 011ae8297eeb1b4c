"""`meshlens proxy` as a program: help, one-line errors, graceful drain on SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess, mesh_yaml
from tests.proxy.wire import read_all
from tests.waiting import PATIENCE_S, wait_until

CMD = [sys.executable, "-m", "meshlens.cli.main", "proxy"]


def test_help_has_examples():
    out = subprocess.run([*CMD, "--help"], capture_output=True, text=True, timeout=PATIENCE_S)
    assert out.returncode == 0 and "examples:" in out.stdout and "--app-port" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--service", "web", "--mesh", "/nonexistent.yaml"], "cannot read mesh file /nonexistent.yaml"),
    (["--service", "nope", "--mesh", "MESH"], "no service 'nope' in the mesh"),
    (["--service", "web", "--mesh", "MESH", "--admin-port", "99999"], "port must be -1..65535"),
    (["--service", "web", "--mesh", "MESH", "--collector", "ftp://x"], "collector URL must be http://"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: {web: {}}\n")
    out = subprocess.run([*CMD, *[str(mesh) if a == "MESH" else a for a in args]], capture_output=True, text=True, timeout=PATIENCE_S)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def _connections(p: ProxyProcess) -> int:
    stats = urllib.request.urlopen(f"http://127.0.0.1:{p.ports['admin']}/stats", timeout=PATIENCE_S).read()
    return json.loads(stats)["downstream_cx_active"]


def test_sigterm_finishes_in_flight_then_exits(tmp_path, upstream):
    """SIGTERM closes idle connections while a request is still in flight, answers that one, then exits
    at once: long before a drain timeout of an hour."""
    p = ProxyProcess(tmp_path, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port),
                     "--no-record", "--drain-timeout", "3600")
    p.start()
    gate = upstream.gate
    gate.arrived.clear()
    gate.released.clear()
    try:
        result: dict[str, bytes] = {}

        def held() -> None:
            with socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S) as s:
                s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
                result["out"] = read_all(s)

        t = threading.Thread(target=held)
        t.start()
        idle = socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S)  # kept-alive, no request
        assert gate.arrived.wait(PATIENCE_S), "the request did not reach the app"
        wait_until(lambda: _connections(p) == 2, "the proxy holding both connections")
        p.proc.send_signal(signal.SIGTERM)
        assert idle.recv(10) == b""  # idle connections are closed at once: the held request is still in flight
        idle.close()
        assert t.is_alive() and "out" not in result
        gate.released.set()
        t.join(PATIENCE_S)
        assert result["out"].startswith(b"HTTP/1.1 200 OK") and result["out"].endswith(b"released\n")
        assert b"connection: close" in result["out"]
        assert p.proc.wait(PATIENCE_S) == 0  # drained: it does not wait out --drain-timeout
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S)
    finally:
        gate.released.set()
        p.stop()
        p.kill()


def test_idle_keep_alive_connections_are_closed(tmp_path, upstream):
    p = ProxyProcess(tmp_path, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port),
                     "--no-record", "--idle-timeout", "0.5")
    p.start()
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S) as s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 OK")
            t0 = time.monotonic()
            assert s.recv(10) == b""  # however long a slow machine takes to notice
            assert time.monotonic() - t0 > 0.3  # not before the idle timeout (its clock started before ours)
    finally:
        p.stop()
        p.kill()


def test_the_sidecar_process_loads_no_data_libraries():
    """pyarrow, pandas and chdb cost the sidecar ~40 MB of RSS it never uses (Envoy's is 40-60 MB in all)."""
    code = ("import sys; from meshlens.cli.main import build_parser; build_parser(); "
            "import proxy.server, proxy.admin, collector.client; "
            "print(sorted(m for m in ('pyarrow', 'pandas', 'numpy', 'chdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_upstream_timeout_answers_504_ut_and_the_app_is_not_waited_for(tmp_path, upstream):
    """--upstream-timeout (off by default, as in Istio): a response that does not come in time is
    504 with response flag UT in the record; the held request is never released here."""
    gate = upstream.gate
    gate.arrived.clear()
    gate.released.clear()
    p = ProxyProcess(tmp_path, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port),
                     "--no-record", "--upstream-timeout", "0.5")
    p.start()
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=PATIENCE_S) as s:
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and b"upstream request timeout" in head
        assert gate.arrived.is_set()  # it reached the app, which was too slow
        out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "proxy", "--help"], capture_output=True, text=True)
        assert "--upstream-timeout" in out.stdout
    finally:
        gate.released.set()
        p.stop()
        p.kill()

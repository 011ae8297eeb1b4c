"""`meshlens proxy` as a program: help, one-line errors, graceful drain on SIGTERM."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.proxy.processes import ProxyProcess, mesh_yaml
from tests.proxy.conftest import free_port

CMD = [sys.executable, "-m", "meshlens.cli.main", "proxy"]


def test_help_has_examples():
    out = subprocess.run([*CMD, "--help"], capture_output=True, text=True, timeout=30)
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
    out = subprocess.run([*CMD, *[str(mesh) if a == "MESH" else a for a in args]], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_sigterm_finishes_in_flight_then_exits(tmp_path, upstream):
    p = ProxyProcess(tmp_path, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port), "--no-record")
    p.start()
    try:
        result: dict[str, bytes] = {}

        def slow() -> None:
            with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
                s.sendall(b"GET /sleep?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
                chunks = []
                while c := s.recv(65536):
                    chunks.append(c)
                result["out"] = b"".join(chunks)

        t = threading.Thread(target=slow)
        t.start()
        idle = socket.create_connection(("127.0.0.1", p.inbound), timeout=5)  # kept-alive, no request
        time.sleep(0.3)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert idle.recv(10) == b""  # idle connections are closed at once
        idle.close()
        t.join(10)
        assert result["out"].startswith(b"HTTP/1.1 200 OK") and result["out"].endswith(b"slept\n")
        assert b"connection: close" in result["out"]
        assert p.proc.wait(10) == 0 and time.monotonic() - t0 < 5
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p.inbound), timeout=2)
    finally:
        p.stop()
        p.kill()


def test_idle_keep_alive_connections_are_closed(tmp_path, upstream):
    p = ProxyProcess(tmp_path, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port),
                     "--no-record", "--idle-timeout", "0.5")
    p.start()
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=5) as s:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 OK")
            t0 = time.monotonic()
            assert s.recv(10) == b""
            assert 0.3 < time.monotonic() - t0 < 3
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

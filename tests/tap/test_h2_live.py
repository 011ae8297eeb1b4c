"""Real h2c peers on loopback, captured by tcpdump, read back by `meshlens tap --pcap`: the tap's calls
are, call for call, what the peers saw (grpcio's client and server; curl and h2load against nginx), and
tshark decodes the same paths from the same file."""
from __future__ import annotations

import collections
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from tests.clickhouse_server import free_port
from tests.grpc_peers import grpc_server as serve_grpc
from tests.grpc_peers import run_grpc_client
from tests.waiting import PATIENCE_S, wait_until

ROOT = Path(__file__).parents[2]
MARKER = b"MESHLENS-END-OF-CAPTURE"
H2LOAD_REQUESTS = 120  # on 2 connections, 4 streams in flight each: a count, not a rate

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None or shutil.which("tshark") is None,
                                reason="tcpdump or tshark (the capture, the cross-check) is not installed: "
                                       "run scripts/install-system.sh")


class Capture:
    """tcpdump on lo for one port, into `pcap`; stop() returns once everything sent before it is in the file."""

    def __init__(self, port: int, pcap: Path) -> None:
        self.port, self.pcap = port, pcap
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-w", str(pcap), "-U", "--immediate-mode",
                                      "-B", "65536", f"tcp port {port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening" in line, line

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # the test failed before stop()
            self.proc.kill()
            self.proc.communicate(timeout=PATIENCE_S)

    def stop(self) -> str:
        # a last connection's bytes in the file mean every packet captured before them is there too
        with socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE_S) as s:
            s.sendall(MARKER)
            wait_until(lambda: MARKER in self.pcap.read_bytes(), "tcpdump writing the marker")
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=PATIENCE_S)
        assert "0 packets dropped by kernel" in err, err
        return err


def tap_calls(pcap: Path, tmp_path: Path) -> list[dict]:
    out = tmp_path / "calls.parquet"
    r = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "tap", "--no-progress", "--pcap", str(pcap),
                        "--out", str(out)], capture_output=True, text=True, timeout=PATIENCE_S, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    calls = pq.read_table(out).to_pylist()
    for c in calls:
        c["attributes"] = dict(c["attributes"])
    return [c for c in calls if c["protocol"] in ("h2", "grpc")]


def tshark_paths(pcap: Path, port: int) -> collections.Counter:
    """The request paths tshark decodes from the file (its own HPACK)."""
    r = subprocess.run(["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},http2", "-Y", "http2.headers.path",
                        "-T", "fields", "-e", "http2.headers.path"], capture_output=True, text=True,
                       timeout=PATIENCE_S)
    assert r.returncode == 0, r.stderr
    return collections.Counter(p for line in r.stdout.split() for p in line.split(","))


# -- gRPC ----------------------------------------------------------------------------------

@pytest.fixture
def grpc_server() -> Iterator[int]:
    with serve_grpc() as port:
        yield port


def test_grpc_calls_match_the_client_call_for_call(grpc_server: int, tmp_path: Path) -> None:
    pcap = tmp_path / "grpc.pcap"
    with Capture(grpc_server, pcap) as cap:
        seen = run_grpc_client(grpc_server)
        cap.stop()
    calls = tap_calls(pcap, tmp_path)
    assert seen[("/demo.Greeter/Slow", grpc.StatusCode.DEADLINE_EXCEEDED.value[0])] == 1
    slow = [c for c in calls if c["path"] == "/demo.Greeter/Slow"]
    assert len(slow) == 1
    # at its deadline the client resets the stream (CANCEL); the server may have sent its own status first
    assert slow[0]["grpc_status"] == 4 or (slow[0]["error"], slow[0]["attributes"].get("h2.reset")) == (
        "reset", "CANCEL"), slow
    others = collections.Counter((c["path"], c["grpc_status"]) for c in calls if c is not slow[0])
    assert others == seen - collections.Counter({("/demo.Greeter/Slow", 4): 1})
    assert {(c["protocol"], c["method"] == c["path"] == c["route"]) for c in calls} == {("grpc", True)}
    fail = next(c for c in calls if c["path"] == "/demo.Greeter/Fail")
    assert fail["attributes"]["grpc.message"] == "no such user: é" and fail["status"] == 200
    late = next(c for c in calls if c["path"] == "/demo.Greeter/FailLate")
    assert late["attributes"]["grpc.message"] == "stop here" and late["response_bytes"] == 5 + 3
    stream = next(c for c in calls if c["path"] == "/demo.Greeter/Stream")
    assert stream["response_bytes"] == 3 * (5 + 6) and stream["request_bytes"] == 5 + 10
    assert all(c["dst_port"] == grpc_server for c in calls)
    assert tshark_paths(pcap, grpc_server) == collections.Counter(c["path"] for c in calls)


def test_capture_begun_mid_connection_is_one_h2_call(grpc_server: int, tmp_path: Path) -> None:
    pcap = tmp_path / "mid.pcap"
    with grpc.insecure_channel(f"127.0.0.1:{grpc_server}") as channel:
        hello = channel.unary_unary("/demo.Greeter/Hello")
        hello(b"before", timeout=PATIENCE_S)  # the preface and the HPACK tables are built before the capture
        with Capture(grpc_server, pcap) as cap:
            for _ in range(3):
                hello(b"during", timeout=PATIENCE_S)
            channel.close()
            cap.stop()
    calls = tap_calls(pcap, tmp_path)
    assert [(c["protocol"], c["path"], c["attributes"].get("h2.undecoded")) for c in calls] == [
        ("h2", "", "capture started mid-connection")]


# -- nginx, curl, h2load -------------------------------------------------------------------

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format tap '$status $request_method $uri $server_protocol';
    access_log {d}/access.log tap;
    client_body_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ return 200 "ok\\n"; }}
        location /missing {{ return 404; }}
        location /teapot {{ return 418 "short and stout"; }}
    }}
}}
"""


@pytest.fixture
def nginx_h2c(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    if shutil.which("nginx") is None or shutil.which("curl") is None or shutil.which("h2load") is None:
        pytest.skip("nginx, curl or h2load (nghttp2-client) is not installed: run scripts/install-system.sh")
    d, port = tmp_path / "nginx", free_port()
    (d / "tmp").mkdir(parents=True)
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port))
    proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    try:
        wait_until(up, "nginx listening")
        yield d, port
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(PATIENCE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served(log: Path, expected: int) -> collections.Counter:
    lines = wait_until(lambda: (lambda ls: ls if len(ls) >= expected else None)(log.read_text().splitlines()),
                       f"nginx logging {expected} requests")
    assert {line.split()[3] for line in lines} == {"HTTP/2.0"}
    return collections.Counter((m, uri, int(s)) for s, m, uri, _ in (line.split() for line in lines))


def test_curl_and_h2load_against_nginx_h2c(nginx_h2c: tuple[Path, int], tmp_path: Path) -> None:
    d, port = nginx_h2c
    pcap = tmp_path / "nginx.pcap"
    with Capture(port, pcap) as cap:
        base = f"http://127.0.0.1:{port}"
        # a 404, a 418, a HEAD; one curl each: Debian's curl 7.88 fails reusing an h2c prior-knowledge
        # connection ("Error in the HTTP2 framing layer"), so many streams on one connection are h2load's
        for url, extra in ((f"{base}/a?q=1", []), (f"{base}/missing", []), (f"{base}/teapot", []),
                           (f"{base}/head", ["-I"])):
            r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--http2-prior-knowledge", *extra, url],
                               capture_output=True, text=True, timeout=PATIENCE_S)
            assert r.returncode == 0, r.stderr
        r = subprocess.run(["h2load", "-n", str(H2LOAD_REQUESTS), "-c", "2", "-m", "4", f"{base}/load"],
                           capture_output=True, text=True, timeout=PATIENCE_S)
        assert f"{H2LOAD_REQUESTS} succeeded" in r.stdout, r.stdout + r.stderr
        expected = 4 + H2LOAD_REQUESTS
        log = served(d / "access.log", expected)
        cap.stop()
    calls = tap_calls(pcap, tmp_path)
    assert sum(log.values()) == expected
    assert collections.Counter((c["method"], c["path"], c["status"]) for c in calls) == log
    assert {(c["protocol"], c["error"]) for c in calls} == {("h2", "")}
    assert next(c for c in calls if c["path"] == "/a")["response_bytes"] == 3
    assert next(c for c in calls if c["path"] == "/teapot")["response_bytes"] == len("short and stout")
    assert tshark_paths(pcap, port) == collections.Counter(
        c["path"] + ("?q=1" if c["path"] == "/a" else "") for c in calls)

"""meshlens/cli/tap_cmd.py: `meshlens tap --pcap` end to end, into a file and into a real collector."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.tap.pcapgen import Flow, write_pcap, write_pcapng
from tests.waiting import PATIENCE_S, wait_until

NOW = time.time_ns()  # the collector drops calls older than its retention
MESH = """services:
  web:
    instances: [{address: "10.0.0.1:40000"}]
  api:
    instances: [{address: "10.0.0.2:80", labels: {version: v1}}]
    subsets: {v1: {version: v1}}
"""


def tap(*args: str, timeout: float = PATIENCE_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", "tap", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def traffic(n_conns: int = 3, per_conn: int = 4) -> list[tuple[int, bytes]]:
    """`n_conns` keep-alive connections, `per_conn` GETs each, interleaved; statuses cycle 200/404/503."""
    per = []
    for c in range(n_conns):
        flow = Flow(client_port=40000 + c)
        ex = []
        for i in range(per_conn):
            status = (200, 404, 503)[(c + i) % 3]
            ex += [(0, f"GET /c{c}/r{i} HTTP/1.1\r\nHost: api\r\n\r\n".encode()),
                   (1, f"HTTP/1.1 {status} X\r\nContent-Length: {i}\r\n\r\n".encode() + b"z" * i)]
        per.append([flow.frame(s) for s in flow.conversation(ex)])
    frames = [seq[k] for k in range(max(map(len, per))) for seq in per if k < len(seq)]
    return [(NOW + i * 1000, f) for i, f in enumerate(frames)]


def expected(n_conns: int = 3, per_conn: int = 4) -> list[tuple]:
    return sorted((f"/c{c}/r{i}", (200, 404, 503)[(c + i) % 3], i) for c in range(n_conns) for i in range(per_conn))


def test_pcap_to_parquet_with_mesh_names(tmp_path: Path) -> None:
    pcap, out, mesh = tmp_path / "t.pcap", tmp_path / "calls.parquet", tmp_path / "mesh.yaml"
    write_pcap(str(pcap), traffic())
    mesh.write_text(MESH)
    r = tap("--pcap", str(pcap), "--out", str(out), "--mesh", str(mesh), "--tap-id", "t1")
    assert r.returncode == 0, r.stderr
    assert "packets=" in r.stderr and "calls=12 " in r.stderr and "gaps=0" in r.stderr
    rows = pq.read_table(out).to_pylist()
    assert sorted((x["path"], x["status"], x["response_bytes"]) for x in rows) == expected()
    assert {(x["src_service"], x["dst_service"], x["dst_subset"], x["observer"], x["observer_id"]) for x in rows} == {
        ("web", "api", "v1", "wire", "t1"), ("10.0.0.1:40001", "api", "v1", "wire", "t1"),
        ("10.0.0.1:40002", "api", "v1", "wire", "t1")}


def test_pcapng_to_csv(tmp_path: Path) -> None:
    pcap, out = tmp_path / "t.pcapng", tmp_path / "calls.csv"
    write_pcapng(str(pcap), [(1, 9)], [(0, t, f) for t, f in traffic(2, 2)])
    r = tap("--pcap", str(pcap), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = pcsv.read_csv(out).to_pylist()
    assert sorted((x["path"], x["status"], x["response_bytes"]) for x in rows) == expected(2, 2)


def test_truncated_pcap_keeps_calls_read_before(tmp_path: Path) -> None:
    pcap, out = tmp_path / "cut.pcap", tmp_path / "calls.parquet"
    packets = traffic(1, 4)
    write_pcap(str(pcap), packets)
    # cut inside the 5th exchange's packets: keep the first 9 frames (handshake + 3 exchanges), then half a record
    keep = 24 + sum(16 + len(f) for _, f in packets[:9])
    pcap.write_bytes(pcap.read_bytes()[:keep + 20])
    r = tap("--pcap", str(pcap), "--out", str(out))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"meshlens tap: {pcap}: truncated") and "3 calls read before it were kept" in last
    assert sorted(x["path"] for x in pq.read_table(out).to_pylist()) == ["/c0/r0", "/c0/r1", "/c0/r2"]


@pytest.mark.parametrize("args, message", [
    (["--pcap", "/nonexistent.pcap"], "meshlens tap: cannot open capture file /nonexistent.pcap: No such file or directory"),
    (["--iface", "nonexistent0"], "meshlens tap: no such interface: nonexistent0"),
    (["--iface", "lo", "--filter", "tcp port"], "meshlens tap: Failed to compile filter expression 'tcp port' "
                                                "(can't parse filter expression: syntax error)"),
    (["--pcap", "/dev/null", "--out", "x.json"], "meshlens tap: --out must end in .parquet or .csv, not 'x.json'"),
])
def test_user_errors_are_one_line_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "tap", *args], capture_output=True, text=True,
                       timeout=PATIENCE_S, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, message + "\n")


def test_corrupt_pcap_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture file at all" * 4)
    r = tap("--pcap", str(bad), "--out", str(tmp_path / "o.parquet"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()[-1]) < 300 and str(bad) in r.stderr


def test_pcap_into_a_real_collector(tmp_path: Path) -> None:
    pcap = tmp_path / "t.pcap"
    write_pcap(str(pcap), traffic())
    with CollectorProcess(tmp_path / "collector") as proc:
        r = tap("--pcap", str(pcap), "--collector", f"{proc.base}/v1/calls")
        assert r.returncode == 0, r.stderr
        assert "sent=12 dropped=0" in r.stderr
        store = connect(proc.query_url)
        sql = "SELECT path, status, response_bytes, observer, protocol, dst_service FROM meshlens.calls"
        rows = wait_until(lambda: (got := store.query_rows(sql)) and len(got) >= 12 and got, "12 calls stored")
        assert sorted(x[:3] for x in rows) == expected()
        assert {x[3:] for x in rows} == {("wire", "http/1.1", "10.0.0.2:80")}


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_workers_share_connections_and_give_the_same_calls(tmp_path: Path, ext: str) -> None:
    pcap = tmp_path / "t.pcap"
    write_pcap(str(pcap), traffic(7, 3))
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"calls-{workers}.{ext}"
        r = tap("--pcap", str(pcap), "--out", str(out), "--workers", str(workers))
        assert r.returncode == 0, r.stderr
        assert f"calls=21 incomplete=0 gaps=0 written=21 file={out}" in r.stderr
        table = pq.read_table(out) if ext == "parquet" else pcsv.read_csv(out)
        outs.append(sorted((x["time"], x["path"], x["status"], x["src_port"]) for x in table.to_pylist()))
    assert outs[0] == outs[1] and len(outs[0]) == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.pcap", f"calls-1.{ext}", f"calls-3.{ext}"])

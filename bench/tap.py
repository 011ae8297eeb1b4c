"""Benchmark: `meshlens tap --pcap` against Debian's tshark on the same generated capture.

The capture: keep-alive HTTP/1.1 across 10k connections (1,000 open at a time,
their packets interleaved), >= 1M packets, generated once into a temp dir. Both
tools read it in the same run; packets/s, calls/s, their ratio and both call
counts are printed (target: >= 2x tshark, same count).

    .venv/bin/python bench/tap.py [--connections 10000] [--exchanges 50] [--workers N] [--keep DIR]

tshark is single-threaded; `meshlens tap` is shown with one process and with
`--workers N` (one process per CPU, each taking a share of the connections).
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tap.pcapgen import Flow  # noqa: E402

STATUSES = (200, 200, 200, 404, 500)


def generate(path: Path, connections: int, exchanges: int, concurrent: int = 1000) -> tuple[int, int]:
    """Write the capture; return (packets, expected calls)."""
    t = time.time_ns() - 3_600_000_000_000
    packets = calls = 0
    rec = struct.Struct("<IIII")
    with open(path, "wb", buffering=1 << 22) as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for wave in range(0, connections, concurrent):
            convs = []
            for c in range(wave, min(wave + concurrent, connections)):
                flow = Flow(client=f"10.1.{c // 250}.{c % 250 + 1}", client_port=20000 + c % 40000,
                            server=f"10.2.0.{c % 8 + 1}", server_port=8080, client_isn=c * 7919, server_isn=c * 104729)
                ex = []
                for i in range(exchanges):
                    status = STATUSES[(c + i) % len(STATUSES)]
                    body = b"x" * (20 + (c * 31 + i) % 400)
                    ex.append((0, f"GET /api/items/{i}?c={c} HTTP/1.1\r\nHost: catalog\r\nUser-Agent: bench\r\n"
                                  f"Accept: */*\r\n\r\n".encode()))
                    ex.append((1, f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                                  f"\r\n".encode() + body))
                    calls += 1
                convs.append((flow, flow.conversation(ex)))
            longest = max(len(segs) for _, segs in convs)
            for k in range(longest):
                for flow, segs in convs:
                    if k < len(segs):
                        frame = flow.frame(segs[k])
                        t += 2_000
                        sec, ns = divmod(t, 1_000_000_000)
                        f.write(rec.pack(sec, ns // 1000, len(frame), len(frame)))
                        f.write(frame)
                        packets += 1
    return packets, calls


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--exchanges", type=int, default=50, help="keep-alive exchanges per connection")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="also run meshlens tap --workers N (default: one per CPU)")
    ap.add_argument("--keep", metavar="DIR", help="generate into (or reuse) DIR instead of a temp dir")
    args = ap.parse_args()
    if shutil.which("tshark") is None:
        print("tshark is not installed (apt-get install tshark)", file=sys.stderr)
        return 2
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="meshlens-bench-tap-"))
    d.mkdir(parents=True, exist_ok=True)
    pcap = d / f"http-{args.connections}x{args.exchanges}.pcap"
    t0 = time.perf_counter()
    if pcap.exists():
        from meshlens.tap.pcapfile import read_packets
        packets, expected = sum(1 for _ in read_packets(pcap)), args.connections * args.exchanges
    else:
        packets, expected = generate(pcap, args.connections, args.exchanges)
    print(f"capture: {pcap} packets={packets} calls={expected} size={pcap.stat().st_size / 1e6:.0f}MB "
          f"(ready in {time.perf_counter() - t0:.1f}s)")

    import pyarrow.parquet as pq
    rows = []
    for workers in sorted({1, args.workers}):
        out = d / f"calls-{workers}.parquet"
        secs, r = timed([sys.executable, "-m", "meshlens.cli.main", "tap", "--pcap", str(pcap), "--out", str(out),
                         "--no-progress", "--workers", str(workers)])
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        table = pq.read_table(out, columns=["status", "error"])
        errors = sum(1 for e in table.column("error").to_pylist() if e)
        rows.append((f"meshlens -w{workers}", secs, table.num_rows, errors))

    tshark_s, r = timed(["tshark", "-r", str(pcap), "-Y", "http.response", "-T", "fields", "-e", "http.response.code"])
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    tshark_calls = sum(1 for line in r.stdout.splitlines() if line.strip())

    print(f"{'':13} {'seconds':>8} {'packets/s':>11} {'calls/s':>9} {'calls':>8} {'ratio':>6}")
    for name, secs, n, _ in rows + [("tshark", tshark_s, tshark_calls, 0)]:
        print(f"{name:13} {secs:8.1f} {packets / secs:11,.0f} {n / secs:9,.0f} {n:8} {tshark_s / secs:5.2f}x")
    for name, _, n, errors in rows:
        print(f"{name}: same call count as tshark and as generated: {n == tshark_calls == expected} "
              f"(generated {expected}, tshark {tshark_calls}, {name} {n}, with an error {errors})")
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
          f"{subprocess.run(['tshark', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    if not args.keep:
        shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())

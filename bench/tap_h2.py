"""Benchmark: `meshlens tap --pcap` against tshark's HTTP/2 dissector on the same h2c capture.

The capture, made once into a temp dir (or given with --pcap and its h2c --port): tcpdump on
lo, started before the first connection, of h2load against nginx `listen ... http2` (h2c with
prior knowledge; --connections connections, --streams in flight on each, four paths, one a
404 and one a 2 KiB body) and, at the same time, grpcio clients against a grpcio server
(two channels, each its own connection: unary calls 32 in flight, server-streaming calls,
an error now and then), both ports in one capture.

Both tools read the same file in the same run, alternated, best of --rounds: `meshlens tap
--pcap` in one process and with --workers N (one process per CPU, each taking a share of
the connections), and `tshark -Y http2` printing each frame's stream id and type and the
HPACK-decoded :path and :status (so tshark follows HPACK both ways, as the tap does). The
tap's streams, paths and statuses must be tshark's (and, for a capture made here, what the
clients sent): when they are not the bench says so and exits 1, since a bench of a broken
decoder measures nothing.

    .venv/bin/python bench/tap_h2.py [--requests 200000] [--grpc-calls 20000] [--rounds 3] [--keep DIR]
    .venv/bin/python bench/tap_h2.py --pcap FILE --port 8080 [--port 50051]
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlens.cli.argtypes import port as port_type  # noqa: E402
from meshlens.cli.main import Parser  # noqa: E402  (a usage error in one line)

ROOT = Path(__file__).resolve().parents[1]
MAKE_TOOLS = ("tcpdump", "nginx", "h2load")
PATHS = ("/api/items/1", "/api/users/42", "/missing", "/static/app.js")
GRPC_WINDOW = 32  # unary calls in flight on a channel
GRPC_CHANNELS = 2
BIG_BODY = "x" * 2048  # nginx reads a config token of up to 4 KiB
NGINX_CONF = """
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ default_type application/json; return 200 '{{"id": 1, "name": "item"}}'; }}
        location /missing {{ return 404; }}
        location /static/ {{ default_type application/javascript; return 200 "{big}"; }}
    }}
}}
"""

Counts = tuple[int, collections.Counter, collections.Counter]  # streams, paths, final statuses


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- the capture ---------------------------------------------------------------------------

def grpc_load(port: int, calls: int) -> int:
    """`calls` gRPC calls over GRPC_CHANNELS connections; returns how many were made."""
    import grpc

    from tests.grpc_peers import SERVICE

    def channel_load(share: int) -> int:
        # a subchannel pool of its own: grpcio would otherwise share one connection among channels
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            hello, stream = ch.unary_unary(f"/{SERVICE}/Hello"), ch.unary_stream(f"/{SERVICE}/Stream")
            fail = ch.unary_unary(f"/{SERVICE}/Fail")
            made = window = 0
            while made < share:
                n = min(GRPC_WINDOW, share - made - 1)  # unary calls, then one streaming (or failing) call
                pending = [hello.future(b"x" * (10 + i), timeout=120) for i in range(n)]
                if window % 50 == 49:
                    try:
                        fail(b"who", timeout=120)
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND, e
                else:
                    list(stream(b"s", timeout=120))
                for f in pending:
                    f.result()
                made += n + 1
                window += 1
            return made

    with futures.ThreadPoolExecutor(GRPC_CHANNELS) as pool:
        shares = [calls // GRPC_CHANNELS + (i < calls % GRPC_CHANNELS) for i in range(GRPC_CHANNELS)]
        return sum(pool.map(channel_load, [s for s in shares if s]))


def make_capture(d: Path, args: argparse.Namespace) -> tuple[Path, list[int], int]:
    """Capture h2load against nginx h2c and the gRPC mix; (the pcap, the h2c ports, streams sent)."""
    from tests.clickhouse_server import free_port
    from tests.grpc_peers import METHODS, grpc_server
    from tests.tap.test_h2_live import Capture
    from tests.waiting import wait_until

    class BenchCapture(Capture):
        """The live tests' capture on several ports, without --immediate-mode: tcpdump with it dropped
        packets at h2load's rate (525 of 3,148 for 400 requests), without it none."""

        def __init__(self, ports: list[int], pcap: Path) -> None:
            self.port, self.pcap = ports[0], pcap
            self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-w", str(pcap), "-U", "-B", "65536",
                                          " or ".join(f"tcp port {p}" for p in ports)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert self.proc.stderr is not None
            line = self.proc.stderr.readline()
            if "listening" not in line:
                raise SystemExit(f"tcpdump: {line.strip()}")

    nginx_port = free_port()
    (d / "nginx" / "tmp").mkdir(parents=True, exist_ok=True)
    (d / "nginx" / "nginx.conf").write_text(NGINX_CONF.format(d=d / "nginx", port=nginx_port, big=BIG_BODY))
    nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx" / "nginx.conf"), "-p", str(d / "nginx")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pcap = d / "h2c.pcap"
    try:
        def up() -> bool:
            if nginx.poll() is not None:
                raise SystemExit(f"nginx exited: {nginx.stderr.read().strip() if nginx.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", nginx_port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(up, "nginx listening")
        with grpc_server({m: METHODS[m] for m in ("Hello", "Stream", "Fail")}) as grpc_port, \
                BenchCapture([nginx_port, grpc_port], pcap) as cap:
            made: list[int] = []
            grpc_thread = threading.Thread(target=lambda: made.append(grpc_load(grpc_port, args.grpc_calls)))
            grpc_thread.start()
            r = subprocess.run(["h2load", "-n", str(args.requests), "-c", str(args.connections),
                                "-m", str(args.streams), *(f"http://127.0.0.1:{nginx_port}{p}" for p in PATHS)],
                               capture_output=True, text=True)
            grpc_thread.join()
            if f"{args.requests} done, " not in r.stdout or "0 errored, 0 timeout" not in r.stdout:
                raise SystemExit("h2load: " + next((line for line in r.stdout.splitlines() if "requests:" in line),
                                                   r.stderr.strip()))  # (a 404 is "failed", and answered)
            if made != [args.grpc_calls]:
                raise SystemExit(f"the gRPC load made {made} calls, not {args.grpc_calls}")
            try:
                cap.stop()
            except AssertionError as e:  # tcpdump dropped packets, or never wrote the end marker
                raise SystemExit(f"tcpdump: {' '.join(str(e).split())}") from None
            ports = [nginx_port, grpc_port]
    finally:
        nginx.terminate()
        nginx.wait()
    return pcap, ports, args.requests + args.grpc_calls


# -- the two readers -----------------------------------------------------------------------

def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, r


def tshark_cmd(pcap: Path, ports: list[int]) -> list[str]:
    decode = [a for p in ports for a in ("-d", f"tcp.port=={p},http2")]
    return ["tshark", "-r", str(pcap), *decode, "-Y", "http2", "-T", "fields", "-E", "aggregator=/s",
            "-e", "tcp.stream", "-e", "http2.streamid", "-e", "http2.type", "-e", "http2.headers.path",
            "-e", "http2.headers.status"]


def tshark_counts(out: str) -> Counts:
    """A stream is a (connection, odd stream id) that carried HEADERS; paths without the query, as the tap's."""
    streams, paths, statuses = set(), collections.Counter(), collections.Counter()
    for line in out.splitlines():
        conn, sids, types, path_list, status_list = (line.split("\t") + [""] * 5)[:5]
        for sid, ftype in zip(sids.split(), types.split()):
            if ftype == "1" and int(sid) % 2:
                streams.add((conn, sid))
        paths.update(p.partition("?")[0] for p in path_list.split())
        statuses.update(int(s) for s in status_list.split() if not 100 <= int(s) < 200)
    return len(streams), paths, statuses


def tap_counts(parquet: Path) -> Counts:
    """The tap's stream calls (an h2 connection it could not decode is a call without a stream id)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet, columns=["protocol", "path", "status", "attributes"]).to_pylist()
    streams = [r for r in rows
               if r["protocol"] in ("h2", "grpc") and any(k == "h2.stream_id" for k, _ in r["attributes"])]
    return (len(streams), collections.Counter(r["path"] for r in streams),
            collections.Counter(r["status"] for r in streams if r["status"]))


def main() -> int:
    ap = Parser(prog="bench/tap_h2.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=count, default=200_000, help="h2load requests to nginx (default 200000)")
    ap.add_argument("--connections", type=count, default=32, help="h2load connections (default 32)")
    ap.add_argument("--streams", type=count, default=32, help="h2load streams in flight per connection (default 32)")
    ap.add_argument("--grpc-calls", type=count, default=20_000, help="gRPC calls (default 20000)")
    ap.add_argument("--rounds", type=count, default=3, help="alternated rounds; the best of each is shown (default 3)")
    ap.add_argument("--workers", type=count, default=os.cpu_count() or 1,
                    help="also run meshlens tap --workers N (default: one per CPU)")
    ap.add_argument("--pcap", metavar="FILE", help="read this capture instead of making one (with --port)")
    ap.add_argument("--port", type=port_type(1), action="append", default=[],
                    help="with --pcap: a TCP port whose connections are h2c (tshark decodes only those); repeatable")
    ap.add_argument("--keep", metavar="DIR",
                    help="work in DIR and keep it: the capture (read it again with --pcap), the tap's calls")
    args = ap.parse_args()
    if bool(args.pcap) != bool(args.port):
        sys.exit("--pcap and --port go together: tshark decodes h2c only on the ports it is told")
    missing = [t for t in ("tshark",) + (() if args.pcap else MAKE_TOOLS) if shutil.which(t) is None]
    if missing:
        sys.exit(f"not installed: {', '.join(missing)} (run scripts/install-system.sh)")
    if args.pcap and not os.path.isfile(args.pcap):
        sys.exit(f"no such file: {args.pcap}")
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="meshlens-bench-tap-h2-"))
    try:
        d.mkdir(parents=True, exist_ok=True)
        return run(args, d)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


def run(args: argparse.Namespace, d: Path) -> int:
    t0 = time.perf_counter()
    if args.pcap:
        pcap, ports, sent = Path(args.pcap), args.port, None
    else:
        pcap, ports, sent = make_capture(d, args)
    from meshlens.tap.pcapfile import read_packets
    packets = sum(1 for _ in read_packets(pcap))
    mb = pcap.stat().st_size / 1e6
    print(f"capture: {pcap} packets={packets} size={mb:.1f}MB h2c ports={','.join(map(str, ports))} "
          + (f"streams sent={sent} " if sent is not None else "") + f"(ready in {time.perf_counter() - t0:.1f}s)")

    workers = sorted({1, args.workers})
    outs = {f"meshlens -w{w}": d / f"calls-{w}.parquet" for w in workers}
    runs = {name: [sys.executable, "-m", "meshlens.cli.main", "tap", "--pcap", str(pcap), "--out", str(out),
                   "--no-progress", "--workers", name.rpartition("w")[2]] for name, out in outs.items()}
    runs["tshark"] = tshark_cmd(pcap, ports)
    names = list(runs)
    best: dict[str, float] = {}
    counts: dict[str, Counts] = {}
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # each round in a rotated order
            secs, r = timed(runs[name])
            if r.returncode:
                print(f"{name} failed: {r.stderr.strip()}", file=sys.stderr)
                return 1
            got = tshark_counts(r.stdout) if name == "tshark" else tap_counts(outs[name])
            if counts.setdefault(name, got) != got:
                print(f"{name} counted differently in round {i + 1}: {got[0]} streams, then {counts[name][0]}",
                      file=sys.stderr)
                return 1
            best[name] = min(best.get(name, secs), secs)

    tshark_s, (reference, ref_paths, ref_statuses) = best["tshark"], counts["tshark"]
    print(f"best of {args.rounds} rounds")
    print(f"{'':13} {'seconds':>8} {'calls/s':>9} {'packets/s':>10} {'MB/s':>6} {'streams':>8} {'vs tshark':>9}")
    for name in names:
        secs, n = best[name], counts[name][0]
        print(f"{name:13} {secs:8.2f} {n / secs:9,.0f} {packets / secs:10,.0f} {mb / secs:6.2f} {n:8} "
              f"{tshark_s / secs:8.2f}x")
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
          f"{subprocess.run(['tshark', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    wrong = []
    for name in names[:-1]:
        n, paths, statuses = counts[name]
        if n != reference or (sent is not None and n != sent):
            wrong.append(f"{name} {n} streams, tshark {reference}" + (f", sent {sent}" if sent is not None else ""))
        elif paths != ref_paths:
            wrong.append(f"{name}'s paths are not tshark's: {dict((paths - ref_paths) + (ref_paths - paths))}")
        elif statuses != ref_statuses:
            wrong.append(f"{name}'s statuses are not tshark's: {dict(statuses)} against {dict(ref_statuses)}")
    if wrong:
        print("DISAGREE: " + "; ".join(wrong), file=sys.stderr)
        return 1
    print(f"agree: {reference} streams, their paths and statuses, in every reader and round"
          + (" and as sent" if sent is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Live tap on loopback at a fixed call rate: are calls lost?

    .venv/bin/python bench/tap_live.py [--rate 5000] [--seconds 10]

In a network namespace made for the run: nginx (`return 200`, 1 worker) on the
namespace's loopback, `meshlens tap --iface lo` pinned to one core (taskset),
and wrk throttled to --rate requests/s with its Lua `delay()` hook (wrk has no
rate flag; N connections each waiting 1000*N/rate ms between requests). The
tap's calls are compared with nginx's access log: the number served, the number
the tap recorded, and how many of those are incomplete. On loopback every packet
is seen twice (outgoing and incoming); the tap counts each once.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
NS = f"mlbench{os.getpid() % 100000}"
NGINX_CONF = """
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:8080;
        keepalive_requests 1000000;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def ns(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *cmd]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=5000, help="requests per second offered by wrk")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=10)
    args = ap.parse_args()
    for tool in ("ip", "nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/install-system.sh")
    subprocess.run(["ip", "netns", "add", NS], check=True)
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(ns("ip", "link", "set", "lo", "up"), check=True)
        with tempfile.TemporaryDirectory(prefix="meshlens-tap-live-") as tmp:
            d = Path(tmp)
            (d / "tmp").mkdir()
            (d / "nginx.conf").write_text(NGINX_CONF.format(d=d))
            nginx = subprocess.Popen(ns("taskset", "-c", "1", "nginx", "-c", str(d / "nginx.conf"), "-p", str(d)))
            procs.append(nginx)
            time.sleep(0.5)
            out = d / "calls.parquet"
            tap = subprocess.Popen(ns("taskset", "-c", "0", sys.executable, "-m", "meshlens.cli.main", "tap",
                                      "--no-progress", "--iface", "lo", "--filter", "tcp port 8080", "--out", str(out)),
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT)
            procs.append(tap)
            assert tap.stderr is not None
            line = tap.stderr.readline()
            while line and "capturing" not in line:
                line = tap.stderr.readline()
            delay_ms = 1000 * args.connections / args.rate
            script = d / "throttle.lua"
            script.write_text(f"function delay() return {delay_ms:.3f} end\n")
            (d / "access.log").write_text("")
            wrk = subprocess.run(ns("taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}",
                                    f"-d{args.seconds}s", "-s", str(script), "http://127.0.0.1:8080/"),
                                 capture_output=True, text=True, timeout=args.seconds + 60)
            time.sleep(2.0)
            tap.send_signal(signal.SIGTERM)
            _, err = tap.communicate(timeout=120)
            served = sum(1 for _ in (d / "access.log").open())
            calls = pq.read_table(out).to_pylist()
            http = [c for c in calls if c["protocol"] == "http/1.1"]
            incomplete = sum(1 for c in http if c["error"])
            complete = len(http) - incomplete
            offered = served / args.seconds
            print(f"machine: {os.cpu_count()} cores; tap pinned to core 0, nginx and wrk to core 1")
            print(f"wrk: {wrk.stdout.strip().splitlines()[-2] if wrk.stdout else wrk.stderr}")
            print(f"served by nginx: {served} ({offered:,.0f} calls/s over {args.seconds} s)")
            print(f"recorded by the tap: {len(http)} http calls, {complete} complete, {incomplete} incomplete, "
                  f"missing {served - len(http)}")
            print(f"tap summary: {err.strip().splitlines()[-1] if err.strip() else '(none)'}")
            print(f"lost or incomplete: {(served - complete) / max(served, 1):.3%}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run(["ip", "netns", "del", NS], check=False)


if __name__ == "__main__":
    main()

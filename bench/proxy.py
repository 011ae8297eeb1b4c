"""The sidecar's hot path against nginx, in the same run: wrk through one proxy process.

Run: .venv/bin/python bench/proxy.py [--duration 5] [--connections 32]
Upstream: nginx (1 worker) `return 200`. Reference: nginx (1 worker) `proxy_pass` with
upstream keepalive to the same upstream. Measured: meshlens proxy (inbound listener)
with recording off; on, shipping to a real collector subprocess on the same two cores;
and on, shipping to a sink that takes batches and discards them (nginx `return 200`),
which isolates what recording costs the sidecar itself, as when the collector runs on
another machine. Prints req/s, p50/p99 and the ratios, the CPU each request cost the
process serving it (user and system µs, from /proc: the nginx worker, the sidecar, its
recorder thread included), and the proxy's RSS after the load. Reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.collector_process import CollectorProcess  # noqa: E402
from tests.proxy.processes import ProxyProcess  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
OFF, ON, SINK = "meshlens (recording off)", "meshlens (recording on)", "meshlens (recording on, to a sink)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx(workdir: Path, server_block: str, http_extra: str = "", listen: str = "",
          worker_connections: int = 1024) -> tuple[subprocess.Popen, int]:
    """nginx, 1 worker, on an ephemeral port; `listen` the listen directive's parameters after the address (ssl)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fcgi; uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
  keepalive_requests 1000000;
  {http_extra}
  server {{ listen 127.0.0.1:{port} {listen}; {server_block} }}
}}""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def wrk(port: int, duration: int, connections: int, host: str = "") -> dict:
    """wrk to `port` (with Host: `host` when given): req/s, requests, p50/p99 ms, its error lines, and its whole
    output when it had errors."""
    extra = ["-H", f"Host: {host}"] if host else []
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", *extra,
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=duration + 30).stdout

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.findall(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)), "p50_ms": pct("50"),
            "p99_ms": pct("99"), "errors": "; ".join(errors), "output": out if errors else ""}


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def worker(pid: int) -> int:
    """nginx's one worker process (its master only forks it)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])


def measured(pid: int, port: int, duration: int, connections: int) -> dict[str, float]:
    """wrk against `port`, with the CPU `pid` spent meanwhile, per request."""
    c0 = cpu_s(pid)
    r = wrk(port, duration, connections)
    c1 = cpu_s(pid)
    n = max(1, r["requests"])
    r["user_us"], r["sys_us"] = (c1[0] - c0[0]) / n * 1e6, (c1[1] - c0[1]) / n * 1e6
    return r


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-proxy-"))
    procs: list[subprocess.Popen] = []
    proxies: list[ProxyProcess] = []
    col = None
    results: dict[str, dict[str, float]] = {}
    try:
        up, up_port = nginx(tmp / "upstream", 'location / { return 200 "ok\\n"; }')
        procs.append(up)
        ref, ref_port = nginx(tmp / "reference",
                              "location / { proxy_pass http://up; proxy_http_version 1.1; "
                              'proxy_set_header Connection ""; }',
                              f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 32; }}")
        procs.append(ref)
        sink, sink_port = nginx(tmp / "sink", 'location / { return 200 "{}"; }', "client_max_body_size 64m;")
        procs.append(sink)
        col = CollectorProcess(tmp / "collector").start()
        mesh = json.dumps({"services": {"bench": {}}})
        variants = ((OFF, ["--no-record"]), (ON, ["--collector", f"{col.base}/v1/calls"]),
                    (SINK, ["--collector", f"http://127.0.0.1:{sink_port}/v1/calls"]))
        for i, (name, extra) in enumerate(variants):
            p = ProxyProcess(tmp / f"proxy{i}", mesh, "bench",
                             "--app-port", str(up_port), "--admin-port", "-1", "--metrics-port", "-1", *extra)
            proxies.append(p.start())
        wrk(up_port, 1, args.connections)  # warm-up
        results["nginx return 200 (direct)"] = wrk(up_port, args.duration, args.connections)
        results["nginx proxy_pass"] = measured(worker(ref.pid), ref_port, args.duration, args.connections)
        rss = {}
        for (name, _), p in zip(variants, proxies):
            wrk(p.inbound, 1, args.connections)  # warm-up: pool filled, code paths hot
            results[name] = measured(p.proc.pid, p.inbound, args.duration, args.connections)
            rss[name] = rss_mb(p.proc.pid)
        nginx_ref = results["nginx proxy_pass"]
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s, {os.cpu_count()} CPUs")
        print(f"{'':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs nginx':>9} {'p99 vs':>7} {'user us':>8} "
              f"{'sys us':>7}  RSS MB")
        for name, r in results.items():
            cpu = f"{r['user_us']:8.1f} {r['sys_us']:7.1f}" if "user_us" in r else f"{'':8} {'':7}"
            print(f"{name:34} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{r['rps'] / nginx_ref['rps']:8.2f}x {r['p99_ms'] / nginx_ref['p99_ms']:6.2f}x {cpu}"
                  f"  {rss.get(name, float('nan')):.1f} {r['errors']}")
        off = results[OFF]["rps"]
        print(f"recording costs {100 * (1 - results[ON]['rps'] / off):.1f}% of throughput with the collector "
              f"on the same cores, {100 * (1 - results[SINK]['rps'] / off):.1f}% in the sidecar itself")
    finally:
        for p in proxies:
            p.stop()
            p.kill()
        if col is not None:
            col.stop()
            col.kill()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

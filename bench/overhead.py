"""What two sidecars add to a request, measured as Istio measures it, against two nginx hops in the same run.

Istio's method: client -> the client's sidecar (outbound) -> the server's sidecar (inbound) -> server,
16 connections paced to 1,000 req/s in total, 1 KB responses; the latency two sidecars add is their
path's percentile minus the direct path's. Three paths, on loopback, each measured once a round in a
rotated order (2-3 rounds) so that none always runs first or last:

  direct                 wrk -> nginx `return 200` (1 KB)
  two nginx hops         wrk -> nginx proxy_pass -> nginx proxy_pass -> the same server
                         (1 worker each, upstream keepalive, as bench/proxy.py's reference)
  two meshlens sidecars  wrk -> meshlens proxy (client side, outbound) -> meshlens proxy
                         (server side, inbound) -> the same server, both recording to a real
                         `meshlens collector` (embedded store in a temporary directory)

wrk paces with its Lua delay(): each connection waits connections x 1000 / rate ms (16 ms) after a
response before its next request, the connections spread over that period at the start and jittered
by +-10 % (as fortio's -jitter) so that they never fire in lockstep. Percentiles are wrk's own
histogram (latency:percentile, in us), exact. Per sidecar: CPU (utime+stime from /proc/PID/stat,
children included) over each measured window, as vCPU per 1,000 req/s at the achieved rate, and RSS
(VmRSS) at the end of the run. Reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.proxy import nginx  # noqa: E402
from tests.collector_process import CollectorProcess  # noqa: E402
from tests.proxy.processes import ProxyProcess  # noqa: E402

EXAMPLES = """\
example:
  .venv/bin/python bench/overhead.py                    # 3 rounds of 15 s per path, ~3 minutes
  .venv/bin/python bench/overhead.py --duration 5 --rounds 2

goals (Istio's and Linkerd's published figures): added latency <= 2x two nginx hops' at p90 and
p99; <= 0.05 vCPU per sidecar at 1,000 req/s (Istio publishes 0.20); <= 26 MB RSS (Linkerd)."""

DIRECT, NGINX, MESHLENS = "direct", "two nginx hops", "two meshlens sidecars"
PATHS = (DIRECT, NGINX, MESHLENS)
BODY = "x" * 1024  # Istio's benchmark answers 1 KB
SERVICE = "server"  # the Host every path's requests carry: the client sidecar routes on it
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The pacing, per connection: the first response of each starts it at a different point of the
# period; after that, the period +-10 % (uniform, whole milliseconds: wrk's timer unit; mean kept).
WRK_SCRIPT = """\
wrk.headers["Host"] = "{host}"
local period, connections, jitter, first = {period}, {connections}, {jitter}, 0
function delay()
  if first < connections then
    first = first + 1
    return math.floor(period * first / connections)
  end
  return period + math.random(-jitter, jitter)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d "
    .. "p50=%d p90=%d p99=%d max=%d\\n", summary.requests, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class Run:
    """One wrk run on one path, with what the sidecars and the machine spent during it."""

    path: str
    requests: int
    seconds: float  # wrk's own duration
    errors: int  # connect + read + write + timeout + non-2xx/3xx
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    sidecar_cpu_s: dict[str, float]  # per sidecar, over the window
    collector_cpu: float  # cores the collector used during the window (on the same cores)
    window_s: float
    others_cpu: float  # cores used by processes not of this run (machine user+system minus ours)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def pct(self, p: int) -> float:
        return {50: self.p50_ms, 90: self.p90_ms, 99: self.p99_ms}[p]

    def vcpu_per_1000(self, sidecar: str) -> float:
        return self.sidecar_cpu_s[sidecar] / self.window_s * 1000 / self.rate


# -- /proc ------------------------------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) is [0]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                tree.setdefault(int(_stat_fields(d)[1]), []).append(int(d))
            except (OSError, IndexError):
                pass  # exited while we looked
    return tree


def _descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, ()))
    return out


def tree_cpu_s(pid: int, tree: dict[int, list[int]], reaped: bool = False) -> float:
    """utime+stime of `pid` and its live descendants (plus what `pid` reaped, if `reaped`), seconds."""
    ticks = 0
    for p in _descendants(pid, tree):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        ticks += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if reaped and p == pid else 0)
    return ticks / CLK_TCK


def machine_busy_s() -> float:
    """user+nice+system of all CPUs since boot, seconds (irq and softirq left out, as processes' times do)."""
    with open("/proc/stat") as f:
        user, nice, system = (int(v) for v in f.readline().split()[1:4])
    return (user + nice + system) / CLK_TCK


def status_mb(pid: int, tree: dict[int, list[int]], field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) summed over the process and its descendants, MB."""
    kb = 0
    for p in _descendants(pid, tree):
        try:
            with open(f"/proc/{p}/status") as f:
                kb += next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
        except (OSError, StopIteration):
            pass
    return kb / 1024


# -- load ---------------------------------------------------------------------------------------------------


def wrk(port: int, seconds: float, connections: int, rate: float, script_dir: Path) -> dict[str, float]:
    """wrk -t1, paced as the module says; returns the RESULT line's fields (latencies in us)."""
    period = round(connections * 1000 / rate)
    script = script_dir / "paced.lua"
    script.write_text(WRK_SCRIPT.format(host=SERVICE, period=period, connections=connections,
                                        jitter=max(1, round(period / 10))))
    r = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script),
                        f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^RESULT (.*)$", r.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk printed no result (exit {r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
    return {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def measure(path: str, port: int, args: argparse.Namespace, tmp: Path, sidecars: dict[str, int],
            collector: int) -> Run:
    me = os.getpid()
    tree = _children()
    cpu0 = {name: tree_cpu_s(pid, tree) for name, pid in sidecars.items()}
    col0 = tree_cpu_s(collector, tree)
    ours0, busy0, t0 = tree_cpu_s(me, tree, reaped=True), machine_busy_s(), time.monotonic()
    w = wrk(port, args.duration, args.connections, args.rate, tmp)
    t1, busy1 = time.monotonic(), machine_busy_s()
    tree = _children()
    ours1 = tree_cpu_s(me, tree, reaped=True)  # wrk, reaped by now, is in our children's times
    cpu1 = {name: tree_cpu_s(pid, tree) for name, pid in sidecars.items()}
    col1 = tree_cpu_s(collector, tree)
    errors = int(w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"])
    window = t1 - t0
    return Run(path, int(w["requests"]), w["duration_us"] / 1e6, errors, w["p50"] / 1000, w["p90"] / 1000,
               w["p99"] / 1000, w["max"] / 1000, {n: cpu1[n] - cpu0[n] for n in sidecars}, (col1 - col0) / window,
               window, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / window)


def stored_calls(query_url: str) -> dict[str, tuple[int, int]]:
    """observer -> (rows, rows with status 200) in the collector's calls table."""
    sql = b"SELECT observer, count(), countIf(status = 200) FROM meshlens.calls GROUP BY observer FORMAT TSV"
    with urllib.request.urlopen(urllib.request.Request(query_url, data=sql), timeout=60) as r:
        rows = [line.split("\t") for line in r.read().decode().splitlines() if line]
    return {obs: (int(n), int(ok)) for obs, n, ok in rows}


def wait_stored(query_url: str, at_least: int, patience: float = 120.0) -> dict[str, tuple[int, int]]:
    """The stored counts once both observers have `at_least` rows, or once they stop growing for 5 s."""
    deadline, last, since = time.monotonic() + patience, None, time.monotonic()
    while True:
        got = stored_calls(query_url)
        if all(got.get(o, (0, 0))[0] >= at_least for o in ("client", "server")) or time.monotonic() > deadline:
            return got
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > 5:
            return got
        time.sleep(0.3)


# -- report -------------------------------------------------------------------------------------------------


def ms(v: float) -> str:
    return f"{v:7.3f}"


def ratio(num: float, den: float) -> str:
    return f"{num / den:6.2f}x" if den > 0 else "    n/a"


def report(rounds: list[list[Run]], sidecars: list[str], args: argparse.Namespace) -> None:
    print(f"\nwrk -t1 -c{args.connections} paced to {args.rate:g} req/s, {args.duration:g} s per path per round, "
          f"1 KB responses, loopback")
    for i, runs in enumerate(rounds, 1):
        print(f"\nround {i} (order: {', '.join(r.path for r in runs)})")
        print(f"  {'path':24} {'req/s':>7} " + " ".join(f"{h:>7}" for h in ("p50 ms", "p90 ms", "p99 ms", "max ms"))
              + " errors  others' load")
        for r in sorted(runs, key=lambda r: PATHS.index(r.path)):
            print(f"  {r.path:24} {r.rate:7.0f} {ms(r.p50_ms)} {ms(r.p90_ms)} {ms(r.p99_ms)} {ms(r.max_ms)} "
                  f"{r.errors:6d}  {r.others_cpu:.2f} cores")
        by = {r.path: r for r in runs}
        added = {p: [by[p].pct(q) - by[DIRECT].pct(q) for q in (50, 90, 99)] for p in (NGINX, MESHLENS)}
        print("  added over direct, p50/p90/p99 ms: nginx " + " ".join(ms(v) for v in added[NGINX])
              + " | meshlens " + " ".join(ms(v) for v in added[MESHLENS])
              + " | meshlens/nginx " + " ".join(ratio(m, n) for m, n in zip(added[MESHLENS], added[NGINX])))
        m = by[MESHLENS]
        print("  vCPU per 1,000 req/s: " + ", ".join(f"{s} {m.vcpu_per_1000(s):.3f}" for s in sidecars)
              + f"; the collector used {m.collector_cpu:.2f} cores meanwhile")

    med = {p: {q: statistics.median(r.pct(q) for runs in rounds for r in runs if r.path == p) for q in (50, 90, 99)}
           for p in PATHS}
    print(f"\nmedian of {len(rounds)} round(s)      p50 ms  p90 ms  p99 ms")
    for p in PATHS:
        print(f"  {p:24} " + " ".join(ms(med[p][q]) for q in (50, 90, 99)))
    add = {p: {q: med[p][q] - med[DIRECT][q] for q in (50, 90, 99)} for p in (NGINX, MESHLENS)}
    print(f"  {'added: nginx hops':24} " + " ".join(ms(add[NGINX][q]) for q in (50, 90, 99)))
    print(f"  {'added: meshlens':24} " + " ".join(ms(add[MESHLENS][q]) for q in (50, 90, 99)))
    print(f"  {'meshlens / nginx added':24} " + " ".join(ratio(add[MESHLENS][q], add[NGINX][q]) for q in (50, 90, 99))
          + "   (goal <= 2x at p90 and p99)")
    for s in sidecars:
        v = [r.vcpu_per_1000(s) for runs in rounds for r in runs if r.path == MESHLENS]
        print(f"  {s}: vCPU per 1,000 req/s {statistics.median(v):.3f} median (rounds: "
              f"{', '.join(f'{x:.3f}' for x in v)}; goal <= 0.05, Istio 0.20)")


def check_tools() -> str:
    """nginx's path; exits with one line when nginx or wrk is missing."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    for tool, path in (("nginx", found), ("wrk", shutil.which("wrk"))):
        if path is None:
            sys.exit(f"bench/overhead.py: {tool} is not installed (Debian: apt-get install {tool})")
    return found  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds per path per round (default 15)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load on each path first (default 3)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, each path once a round in a rotated order (default 3)")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections (default 16, as Istio)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="total req/s the pacing aims at (default 1000, as Istio)")
    args = ap.parse_args()
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.connections < 1 or args.rate <= 0:
        ap.error("--duration, --rate, --rounds and --connections must be positive, --warmup not negative")
    check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM unwinds through the cleanup too

    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-overhead-"))
    procs: list[subprocess.Popen] = []
    servers: list[CollectorProcess | ProxyProcess] = []
    try:
        up, up_port = nginx(tmp / "server", f'location / {{ default_type text/plain; return 200 "{BODY}"; }}')
        procs.append(up)
        hop = 'location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }'
        hop2, hop2_port = nginx(tmp / "hop2", hop, f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 32; }}")
        procs.append(hop2)
        hop1, hop1_port = nginx(tmp / "hop1", hop, f"upstream up {{ server 127.0.0.1:{hop2_port}; keepalive 32; }}")
        procs.append(hop1)

        col = CollectorProcess(tmp / "collector")
        servers.append(col)
        col.start()
        url = f"{col.base}/v1/calls"
        server_side = ProxyProcess(tmp / "server-sidecar", json.dumps({"services": {SERVICE: {}}}), SERVICE,
                                   "--inbound-host", "127.0.0.1", "--app-port", str(up_port), "--collector", url)
        servers.append(server_side)
        server_side.start()
        mesh = json.dumps({"services": {"client": {}, SERVICE: {"instances": [f"127.0.0.1:{server_side.inbound}"]}}})
        client_side = ProxyProcess(tmp / "client-sidecar", mesh, "client", "--inbound-host", "127.0.0.1",
                                   "--collector", url)
        servers.append(client_side)
        client_side.start()
        assert server_side.proc is not None and client_side.proc is not None and col.proc is not None
        sidecars = {"client sidecar (outbound)": client_side.proc.pid, "server sidecar (inbound)": server_side.proc.pid}
        ports = {DIRECT: up_port, NGINX: hop1_port, MESHLENS: client_side.outbound}

        print(f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
              f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the start")
        sent_through_meshlens = 0
        if args.warmup > 0:
            for p in PATHS:
                w = wrk(ports[p], args.warmup, args.connections, args.rate, tmp)
                if p == MESHLENS:
                    sent_through_meshlens += int(w["requests"])
        rounds: list[list[Run]] = []
        for i in range(args.rounds):
            order = PATHS[i % 3:] + PATHS[:i % 3]
            runs = [measure(p, ports[p], args, tmp, sidecars, col.proc.pid) for p in order]
            sent_through_meshlens += next(r.requests for r in runs if r.path == MESHLENS)
            rounds.append(runs)
            print(f"round {i + 1} done: " + ", ".join(f"{r.path} p99 {r.p99_ms:.3f} ms" for r in runs), flush=True)
        tree = _children()
        memory = {s: (status_mb(pid, tree, "VmRSS"), status_mb(pid, tree, "VmHWM")) for s, pid in sidecars.items()}

        report(rounds, list(sidecars), args)
        for s, (rss, hwm) in memory.items():
            print(f"  {s}: RSS {rss:.1f} MB at the end (peak VmHWM {hwm:.1f} MB; goal <= 26 MB, Linkerd 18-26)")
        for p in (client_side, server_side):
            p.stop()  # SIGTERM: drains and flushes the recorder
        stored = wait_stored(col.query_url, sent_through_meshlens)
        print("  collector stored: "
              + ", ".join(f"{o} {n} ({ok} with status 200)" for o, (n, ok) in sorted(stored.items()))
              + f"; wrk completed {sent_through_meshlens} through the sidecars (warm-up included; requests in flight "
              f"when a wrk run stopped are recorded too)")
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")
    finally:
        for s in reversed(servers):
            s.stop(timeout=30)
            s.kill()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

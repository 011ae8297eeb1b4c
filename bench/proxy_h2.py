"""The sidecar's HTTP/2 against nginx, in the same run: h2load through one proxy process, and through nginx grpc_pass.

Run: .venv/bin/python bench/proxy_h2.py [--requests 10000] [--rounds 3] [--settings 1x1,4x16,16x32]
                                       [--grpc-settings 4x16] [--profile]
e.g. .venv/bin/python bench/proxy_h2.py --requests 2000 --rounds 1 --settings 4x16 --grpc-settings ''

The shape of bench/proxy.py, per core: one sidecar process against one nginx worker. Backends: nginx
(1 worker) `listen ... http2` (h2c, prior knowledge) `return 200 "ok"`; for the gRPC rows a grpcio server
(in this process, 4 threads) whose /bench.Echo/Say answers every call with the same 2-byte message.
Reference: nginx (1 worker) `listen ... http2` with `grpc_pass` (nginx's only HTTP/2 upstream; it takes
plain HTTP/2 requests too) to the same backends, upstream keepalive. Measured: `meshlens proxy` (inbound
listener, `--service backend --app-port BACKEND`, the protocol sniffed) with recording off; on, to a real
collector subprocess on the same two cores; on, to a sink that discards batches (bench/proxy.py's three).
For context, h2load straight to the backend (once a row, after the warm-ups): the backend's own ceiling.

Each setting CxM is `h2load -n N -c C -m M` (C connections, M streams in flight on each); gRPC rows POST a
5-byte-prefixed message with content-type application/grpc and te: trailers. Each path is warmed up, then
the rounds alternate the paths in a rotated order; the table shows each path's median over the rounds,
the ratios of the medians to nginx's and the rounds' range of the same-round ratio. p50/p99 come from
h2load's --log-file (its own output has only min/mean/max/sd). CPU per request of the process serving it
(user and system µs, from /proc: the nginx worker, the sidecar), and the sidecar's RSS after the load.
A path that answers anything but 2xx with the body's bytes (warm-ups included), or a gRPC call through it
that does not end in grpc-status 0 with the message, fails the bench (exit 1, after the figures): the
figures of a broken path measure nothing.

--profile: then py-spy (--native) on the recording-off sidecar under one more load per backend (h2load -D, at
the last setting of each kind), and where its busy time goes: h2/hpack/hyperframe against meshlens' own code,
system calls, garbage collection and the event loop.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.proxy import NGINX, OFF, ON, SINK, cpu_s, nginx, rss_mb, worker  # noqa: E402
from meshlens.cli.main import Parser  # noqa: E402  (a usage error in one line)
from tests.collector_process import CollectorProcess  # noqa: E402
from tests.proxy.processes import ProxyProcess  # noqa: E402

BODY = "ok"
GRPC_METHOD = "/bench.Echo/Say"
GRPC_REQUEST, GRPC_REPLY = b"hi", b"ok"
REFERENCE = "nginx grpc_pass"
DIRECT = "direct to the backend"
# Upstream connections nginx keeps: grpc_pass carries one request a connection, so 16x32 holds 512 at once.
KEEPALIVE = 1024
H2_LIBS = frozenset({"h2", "hpack", "hyperframe"})
OURS = frozenset({"meshlens", *(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())})
SYSCALLS = frozenset({"write", "writev", "send", "sendmsg", "sendto", "read", "readv", "recv", "recvmsg",
                      "recvfrom", "epoll_ctl", "close", "accept4"})
IDLE = "idle (epoll_wait)"  # py-spy --native samples a loop waiting in epoll as running: left out of the shares


class Setting(NamedTuple):
    connections: int
    streams: int

    def __str__(self) -> str:
        return f"{self.connections}x{self.streams}"


class Row(NamedTuple):
    kind: str  # "h2" or "grpc"
    setting: Setting

    def __str__(self) -> str:
        return f"{self.kind} {self.setting}"


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def settings(text: str) -> list[Setting]:
    """`CxM,CxM,...` (connections x streams in flight on each); empty: none."""
    found = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)", item)
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise argparse.ArgumentTypeError(
                f"a setting is CONNECTIONSxSTREAMS, both at least 1, e.g. 4x16; got {item!r}")
        found.append(Setting(int(m.group(1)), int(m.group(2))))
    return found


# -- the load --------------------------------------------------------------------------------

def h2load_cmd(port: int, setting: Setting, grpc_body: Path | None) -> list[str]:
    """h2load at `setting` to `port`: GET / for h2, POSTs of `grpc_body` to GRPC_METHOD for gRPC; -n or -D to add."""
    target = ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(grpc_body),
              f"http://127.0.0.1:{port}{GRPC_METHOD}"] if grpc_body else [f"http://127.0.0.1:{port}/"]
    return ["h2load", "-c", str(setting.connections), "-m", str(setting.streams), *target]


def h2load(port: int, n: int, setting: Setting, grpc_body: Path | None, log: Path) -> dict:
    """h2load to `port`: req/s, p50/p99 ms (from its per-request log), and what went wrong ("" when every
    request was answered 2xx with the body's bytes)."""
    log.unlink(missing_ok=True)  # h2load appends to its log
    r = subprocess.run([*h2load_cmd(port, setting, grpc_body), "-n", str(n), f"--log-file={log}"],
                       capture_output=True, text=True, timeout=600)
    out = r.stdout
    finished = re.search(r"finished in \S+, ([\d.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    data = re.search(r"\((\d+)\) data", out)
    if r.returncode or not (finished and ok and data):
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": "h2load: " + (r.stderr or out).strip()[-300:]}
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.split("\t")[1] != "-1")
    expected = n * (5 + len(GRPC_REPLY) if grpc_body else len(BODY))
    errors = []
    if int(ok.group(1)) != n:
        errors.append(f"{n - int(ok.group(1))} of {n} not 2xx ({re.search(r'status codes: .*', out).group(0)})")
    elif int(data.group(1)) != expected:
        errors.append(f"{data.group(1)} body bytes for {n} answers, not {expected}")
    return {"rps": float(finished.group(1)), "p50_ms": percentile(times, 50) / 1000,
            "p99_ms": percentile(times, 99) / 1000, "errors": "; ".join(errors)}


def percentile(values: list[int], p: int) -> float:
    """The nearest-rank percentile of sorted values (0 when none)."""
    return float(values[max(0, -(-len(values) * p // 100) - 1)]) if values else 0.0


def checked(failed: list[str], label: str, r: dict) -> dict:
    """`r`, its errors (if any) noted in `failed` under `label`."""
    if r["errors"]:
        failed.append(f"{label}: {r['errors']}")
    return r


def measured(pid: int, run: Callable[[], dict], n: int) -> dict:
    """`run()`'s figures, with the CPU `pid` spent meanwhile, per request."""
    c0 = cpu_s(pid)
    r = run()
    c1 = cpu_s(pid)
    r["user_us"], r["sys_us"] = (c1[0] - c0[0]) / n * 1e6, (c1[1] - c0[1]) / n * 1e6
    return r


# -- the gRPC backend and the trailers check -------------------------------------------------

def grpc_backend():  # type: ignore[no-untyped-def]
    """A grpcio server answering GRPC_METHOD with GRPC_REPLY; (server, port)."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service, method = GRPC_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {
        method: grpc.unary_unary_rpc_method_handler(lambda request, context: GRPC_REPLY)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def grpc_check(port: int) -> str:
    """One gRPC call through `port` with grpcio: "" if it ends OK (trailers read) with the reply, else why not."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            reply, call = ch.unary_unary(GRPC_METHOD).with_call(GRPC_REQUEST, timeout=30)
        except grpc.RpcError as e:
            return f"a gRPC call ended {e.code().name}: {e.details()}"
    return "" if reply == GRPC_REPLY and call.code() == grpc.StatusCode.OK else f"a gRPC call answered {reply!r}"


# -- the profile -----------------------------------------------------------------------------

def frame_parts(frame: str) -> tuple[str, str]:
    """py-spy's `name (file:line)` or `name (library)`: (name, top folder of the file, or the library)."""
    name, _, loc = frame.rpartition(" (")
    return name, loc.rstrip(")").rsplit(":", 1)[0].split("/")[0]


def owner(stack: list[str]) -> tuple[str, str]:
    """What a sample's time is spent on, and the file (or function) that says so. Below the event loop's
    dispatch (the first asyncio frame), the innermost frame of h2/hpack/hyperframe or of ours owns it;
    a system call or a garbage collection is counted as such, whoever made it."""
    name, where = frame_parts(stack[-1])
    if name in ("epoll_wait", "epoll_pwait"):
        return IDLE, name
    if where.startswith("libc.so") and name in SYSCALLS:
        return "system calls (libc)", name
    if name.startswith("gc_collect"):
        return "garbage collection", name
    start = next((i for i, f in enumerate(stack) if frame_parts(f)[1] == "asyncio"), -1) + 1
    for frame in reversed(stack[start:]):
        top = frame_parts(frame)[1]
        file = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
        if top in H2_LIBS:
            return "h2, hpack, hyperframe", file
        if top in OURS:
            return "meshlens", file
    return "event loop and the rest (uvloop, asyncio, interpreter)", name


def py_spy() -> str:
    """py-spy on PATH or beside this Python (pip installs it in the virtualenv); "" when neither."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.path.exists(found) else ""


def profile(pid: int, load: list[str], seconds: int, out: Path) -> str:
    """py-spy on `pid` for `seconds` while the `load` command runs; the shares of its samples by `owner`."""
    loader = subprocess.Popen([*load, "-D", str(seconds + 2)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0, c0 = time.perf_counter(), cpu_s(pid)
        spy = subprocess.run([py_spy(), "record", "--pid", str(pid), "--rate", "250", "--native", "--format", "raw",
                              "--duration", str(seconds), "-o", str(out)], capture_output=True, text=True,
                             timeout=seconds + 120)
        busy, wall = sum(cpu_s(pid)) - sum(c0), time.perf_counter() - t0
    finally:
        loader.wait(timeout=seconds + 120)
    if spy.returncode or not out.exists():
        raise SystemExit(f"py-spy: {(spy.stderr.strip().splitlines() or ['failed'])[-1]}")
    shares: collections.Counter = collections.Counter()
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for sample in out.read_text().splitlines():
        stack, _, n = sample.rpartition(" ")
        what, file = owner(stack.split(";"))
        shares[what] += int(n)
        files[what][file] += int(n)
    idle = shares.pop(IDLE, 0)
    total = sum(shares.values())
    if not total:
        return "  no samples"
    lines = [f"  {total} samples busy ({idle} idle in epoll_wait left out); the sidecar used {busy / wall:.2f} of a "
             f"core ({busy:.1f} s CPU in {wall:.1f} s)"]
    for what, n in shares.most_common():
        top = ", ".join(f"{f} {100 * k / total:.1f}%" for f, k in files[what].most_common(4))
        lines.append(f"  {100 * n / total:5.1f}%  {what}: {top}")
    h2 = shares["h2, hpack, hyperframe"] / total
    lines.append(f"  h2 is {100 * h2:.0f}% of the sidecar's busy time: without it the same process would serve "
                 f"at most {1 / (1 - h2):.2f}x the requests")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------

def main() -> int:
    ap = Parser(prog="bench/proxy_h2.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=count, default=10_000, help="h2load requests a measured run (default 10000)")
    ap.add_argument("--rounds", type=count, default=3, help="alternated rounds; medians shown (default 3)")
    ap.add_argument("--settings", type=settings, default=settings("1x1,4x16,16x32"),
                    help="h2 rows, CONNECTIONSxSTREAMS comma-separated (default 1x1,4x16,16x32)")
    ap.add_argument("--grpc-settings", type=settings, default=settings("4x16"),
                    help="gRPC rows, the same form; '' for none (default 4x16)")
    ap.add_argument("--profile", action="store_true", help="then profile the recording-off sidecar (py-spy)")
    ap.add_argument("--profile-seconds", type=count, default=5, help="py-spy's samples for each profile (default 5)")
    args = ap.parse_args()
    rows = [Row("h2", s) for s in args.settings] + [Row("grpc", s) for s in args.grpc_settings]
    if not rows:
        ap.error("no setting to run: --settings and --grpc-settings are both empty")
    if args.requests < max(r.setting.connections for r in rows):
        ap.error(f"--requests {args.requests} is fewer than a setting's connections (h2load gives each at least one)")
    missing = [t for t in ("h2load", NGINX) if not shutil.which(t)]
    missing += ["py-spy"] if args.profile and not py_spy() else []
    if missing:
        sys.exit(f"not installed: {', '.join(missing)} (run scripts/install-system.sh; py-spy: pip install py-spy)")
    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-proxy-h2-"))
    try:
        return run(args, rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, rows: list[Row], tmp: Path) -> int:
    procs: list[subprocess.Popen] = []
    proxies: list[ProxyProcess] = []
    col = grpc_server = None
    try:
        backend, backend_port = nginx(tmp / "backend", f'location / {{ return 200 "{BODY}"; }}', listen="http2",
                                      worker_connections=4 * KEEPALIVE)
        procs.append(backend)
        grpc_server, grpc_port = grpc_backend()
        upstreams = "".join(f"upstream {name} {{ server 127.0.0.1:{port}; keepalive {KEEPALIVE}; "
                            f"keepalive_requests 1000000; }}\n"
                            for name, port in (("h2backend", backend_port), ("grpcbackend", grpc_port)))
        ref, ref_port = nginx(tmp / "reference", "location / { grpc_pass grpc://h2backend; } "
                              f"location {GRPC_METHOD} {{ grpc_pass grpc://grpcbackend; }}", upstreams,
                              listen="http2", worker_connections=4 * KEEPALIVE)
        procs.append(ref)
        sink, sink_port = nginx(tmp / "sink", 'location / { return 200 "{}"; }', "client_max_body_size 64m;")
        procs.append(sink)
        col = CollectorProcess(tmp / "collector").start()
        mesh = json.dumps({"services": {"backend": {}}})
        variants = ((OFF, ["--no-record"]), (ON, ["--collector", f"{col.base}/v1/calls"]),
                    (SINK, ["--collector", f"http://127.0.0.1:{sink_port}/v1/calls"]))
        sidecars: dict[tuple[str, str], ProxyProcess] = {}
        for kind, app_port in (("h2", backend_port), ("grpc", grpc_port)):
            if any(r.kind == kind for r in rows):
                for name, extra in variants:
                    p = ProxyProcess(tmp / f"proxy-{kind}-{len(proxies)}", mesh, "backend", "--app-port", str(app_port),
                                     "--admin-port", "-1", "--metrics-port", "-1", *extra)
                    proxies.append(p.start())
                    sidecars[kind, name] = p
        grpc_body = tmp / "grpc-request.bin"
        grpc_body.write_bytes(b"\0" + len(GRPC_REQUEST).to_bytes(4, "big") + GRPC_REQUEST)
        ref_worker = worker(ref.pid)
        failed: list[str] = []
        if any(r.kind == "grpc" for r in rows):  # the trailers path, through each, with a real gRPC client
            for name, port in [(DIRECT, grpc_port), (REFERENCE, ref_port)] + [
                    (name, sidecars["grpc", name].inbound) for name, _ in variants]:
                if why := grpc_check(port):
                    failed.append(f"gRPC through {name}: {why}")

        results: dict[Row, dict[str, list[dict]]] = {}
        logs = tmp / "h2load.log"
        for row in rows:
            body = grpc_body if row.kind == "grpc" else None
            paths = {REFERENCE: (ref_worker, ref_port)} | {
                name: (sidecars[row.kind, name].proc.pid, sidecars[row.kind, name].inbound) for name, _ in variants}

            names = list(paths)
            for name in names:  # warm-up: connections, pools and code paths
                pid, port = paths[name]
                n = max(args.requests // 4, row.setting.connections)
                r = measured(pid, lambda: h2load(port, n, row.setting, body, logs), n)
                checked(failed, f"{row} {name}, warm-up", r)
            direct = checked(failed, f"{row} {DIRECT}", h2load(grpc_port if body else backend_port, args.requests,
                                                                row.setting, body, logs))
            results[row] = {DIRECT: [direct]}
            for i in range(args.rounds):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    pid, port = paths[name]
                    r = measured(pid, lambda: h2load(port, args.requests, row.setting, body, logs), args.requests)
                    results[row].setdefault(name, []).append(checked(failed, f"{row} {name}, round {i + 1}", r))
        rss = {key: rss_mb(p.proc.pid) for key, p in sidecars.items()}
        report(args, results, rss)
        if args.profile:
            for kind, app in (("h2", None), ("grpc", grpc_body)):
                if (kind, OFF) in sidecars:
                    setting = [r.setting for r in rows if r.kind == kind][-1]
                    p = sidecars[kind, OFF]
                    print(f"\nprofile: {OFF}, {kind} {setting}, {args.profile_seconds} s (py-spy --native, 250 Hz)")
                    print(profile(p.proc.pid, h2load_cmd(p.inbound, setting, app), args.profile_seconds,
                                  tmp / f"profile-{kind}.txt"))
        if failed:
            print("FAILED: " + "; ".join(failed), file=sys.stderr)
            return 1
        return 0
    finally:
        for p in proxies:
            p.stop()
            p.kill()
        if col is not None:
            col.stop()
            col.kill()
        if grpc_server is not None:
            grpc_server.stop(grace=None)
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def ratio(value: float, reference: float, same_round: list[float]) -> str:
    """value / reference, and the range of the same-round ratios; "-" when there is nothing to divide by."""
    if not reference or not same_round:
        return "-"
    return f"{value / reference:.2f}x ({min(same_round):.2f}-{max(same_round):.2f})"


def report(args: argparse.Namespace, results: dict[Row, dict[str, list[dict]]],
           rss: dict[tuple[str, str], float]) -> None:
    version = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    nginx_v = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    print(f"{version}, nginx {nginx_v}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"-n {args.requests}, {args.rounds} rounds alternated, medians (same-round ratio range)")
    print(f"{'':10} {'':34} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs nginx':>19} {'p99 vs':>19} "
          f"{'user us':>7} {'sys us':>6} {'RSS MB':>6}")
    for row, by_path in results.items():
        ref = by_path[REFERENCE]
        for name, runs in by_path.items():
            med = {k: statistics.median(r.get(k, float("nan")) for r in runs)
                   for k in ("rps", "p50_ms", "p99_ms", "user_us", "sys_us")}
            vs = p99 = ""
            if name != DIRECT:
                vs, p99 = (ratio(med[k], statistics.median(b[k] for b in ref),
                                 [r[k] / b[k] for r, b in zip(runs, ref) if b[k]]) for k in ("rps", "p99_ms"))
            cpu = f"{med['user_us']:7.1f} {med['sys_us']:6.1f}" if name != DIRECT else f"{'':7} {'':6}"
            mem = f"{rss[row.kind, name]:6.1f}" if (row.kind, name) in rss else f"{'':6}"
            print(f"{str(row):10} {name:34} {med['rps']:8.0f} {med['p50_ms']:7.2f} "
                  f"{med['p99_ms']:7.2f} {vs:>19} {p99:>19} {cpu} {mem}")


if __name__ == "__main__":
    sys.exit(main())

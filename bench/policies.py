"""What enforcing the issue's example costs a sidecar: observe, dry-run and enforce in the same run.

Run: .venv/bin/python bench/policies.py [--duration 5] [--connections 32] [--rounds 3] [--sink]
A real `meshlens control` holds the mesh (payment-service: two nginx `return 200` upstreams of 1 worker
each, labelled version v1 and v2) and the issue's example (tests/meshlens/policy/test_resources.py:
a VirtualService with a header match and a 90/10 split over v1/v2, a DestinationRule with pool limits,
maxRequestsPerConnection 2 and outlier detection), applied in every mode. ONE `meshlens proxy --service web
--control URL --no-record` follows it; wrk -H 'Host: payment-service' goes through its outbound listener.
Recording is off so that the figures are the policies' cost alone; `--sink` adds a second sidecar that
records to a sink (nginx taking batches and discarding them, as bench/proxy.py), measured the same way.

Each round switches payment-service's mode by applying a Mode document (no restart: the sidecar applies
the new revision, checked on its /config): observe, dry-run, enforce, then enforce with the
DestinationRule less maxRequestsPerConnection (every upstream connection closed after two requests is
part of what enforcing the example costs; without it, what is left is the policy chain). Rounds
alternate the modes so that a shared machine's drift falls on all of them. The reference, in the same
rounds: nginx (1 worker) `proxy_pass` to the same two upstreams with upstream keepalive, unlimited and
with `keepalive_requests 2` (what maxRequestsPerConnection: 2 asks of any proxy): its own ratio says what
that policy costs when a proxy in C carries it out. Prints each run, then the
medians, each mode's ratio to observe (goal: >= 0.9x for dry-run and enforce), p50/p99, the sidecar's CPU
per request (user and system µs, from /proc) and wrk's errors. Reported, not asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.proxy import cpu_s, nginx, wrk  # noqa: E402
from tests.control.processes import ControlProcess  # noqa: E402
from tests.meshlens.policy.test_resources import EXAMPLE  # noqa: E402
from tests.proxy.processes import ProxyProcess  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

SERVICE = "payment-service"
NO_PER_CONNECTION = EXAMPLE.replace("        maxRequestsPerConnection: 2\n", "")
assert NO_PER_CONNECTION != EXAMPLE
# (name, the mode applied, the documents applied with it)
RUNS = (("observe", "observe", EXAMPLE), ("dry-run", "dry-run", EXAMPLE), ("enforce", "enforce", EXAMPLE),
        ("enforce, no maxRequestsPerConnection", "enforce", NO_PER_CONNECTION))


def mode_doc(mode: str) -> str:
    return f"apiVersion: meshlens.io/v1alpha1\nkind: Mode\nmetadata:\n  name: {SERVICE}\nspec:\n  mode: {mode}\n"


def apply(control: ControlProcess, workdir: Path, *docs: str) -> int:
    """`meshlens apply -f` the documents as one change; the store's revision after it."""
    f = workdir / f"apply-{time.monotonic_ns()}.yaml"
    f.write_text("\n---\n".join(d.strip() for d in docs) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    env["MESHLENS_CONTROL"] = control.url

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "meshlens.cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=60, check=True).stdout

    cli("apply", "-f", str(f), "--reason", "bench/policies.py")
    return int(json.loads(cli("status", "-o", "json"))["revision"])


def follow(proxy: ProxyProcess, revision: int, mode: str) -> None:
    """Wait until the sidecar applied `revision`, with payment-service in `mode`."""
    def applied() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['admin']}/config", timeout=30) as resp:
            c = json.loads(resp.read())
        dest = c["destinations"].get(SERVICE, {}).get("mode", "observe")
        return c["control"]["version"] == str(revision) and c["control"]["state"] == "ACK" and dest == mode

    wait_until(applied, f"the sidecar on revision {revision}, {SERVICE} in {mode}")


def measured(proxy: ProxyProcess, duration: int, connections: int) -> dict:
    """wrk through the sidecar, with the CPU the sidecar spent meanwhile, per request."""
    pid = proxy.proc.pid
    c0 = cpu_s(pid)
    r = wrk(proxy.outbound, duration, connections, SERVICE)
    c1 = cpu_s(pid)
    n = max(1, r["requests"])
    r["user_us"], r["sys_us"] = (c1[0] - c0[0]) / n * 1e6, (c1[1] - c0[1]) / n * 1e6
    return r


def reference(workdir: Path, ports: list[int], per_connection: int) -> tuple[subprocess.Popen, int]:
    """nginx proxy_pass to the upstreams, keepalive connections carrying at most `per_connection` requests."""
    servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
    return nginx(workdir, 'location / { proxy_pass http://pay; proxy_http_version 1.1; proxy_set_header Connection ""; }',
                 f"upstream pay {{ {servers} keepalive 32; keepalive_requests {per_connection}; }}")


REFERENCES = (("nginx proxy_pass, keepalive", 1_000_000), ("nginx proxy_pass, keepalive_requests 2", 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sink", action="store_true", help="also through a second sidecar recording to a sink")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-policies-"))
    procs: list[subprocess.Popen] = []
    proxies: dict[str, ProxyProcess] = {}
    control: ControlProcess | None = None
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        ups = {}
        for version in ("v1", "v2"):
            up, ups[version] = nginx(tmp / version, f'location / {{ return 200 "{version}\\n"; }}')
            procs.append(up)
        refs = {}
        for name, n in REFERENCES:
            proc, refs[name] = reference(tmp / f"ref{n}", list(ups.values()), n)
            procs.append(proc)
        control = ControlProcess(tmp / "control").start()
        mesh = json.dumps({"services": {"web": {}, SERVICE: {"instances": [
            {"address": f"127.0.0.1:{port}", "labels": {"version": v}} for v, port in ups.items()]}}})
        revision = apply(control, tmp, mesh, EXAMPLE, mode_doc("observe"))
        sidecars = [("recording off", ["--no-record"])]
        if args.sink:
            sink, sink_port = nginx(tmp / "sink", 'location / { return 200 "{}"; }', "client_max_body_size 64m;")
            procs.append(sink)
            sidecars.append(("recording to a sink", ["--collector", f"http://127.0.0.1:{sink_port}/v1/calls"]))
        for i, (label, extra) in enumerate(sidecars):
            p = ProxyProcess(tmp / f"proxy{i}", None, "web", "--metrics-port", "-1", *extra, control=control.url)
            proxies[label] = p.start()
            follow(p, revision, "observe")
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s -H 'Host: {SERVICE}', {os.cpu_count()} CPUs, "
              f"{args.rounds} rounds")
        for rnd in range(1, args.rounds + 1):
            for name, mode, policies in RUNS:
                revision = apply(control, tmp, policies, mode_doc(mode))
                for label, p in proxies.items():
                    follow(p, revision, mode)
                for label, p in proxies.items():
                    wrk(p.outbound, 1, args.connections, SERVICE)  # warm-up: pools, code paths, the new revision's objects
                    r = measured(p, args.duration, args.connections)
                    results.setdefault((label, name), []).append(r)
                    print(f"  round {rnd} {label:20} {name:37} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                          f"p99 {r['p99_ms']:6.2f} ms  {r['errors']}", flush=True)
                    if r["output"]:
                        print(r["output"])
            for name, port in refs.items():
                wrk(port, 1, args.connections, SERVICE)
                r = wrk(port, args.duration, args.connections, SERVICE)
                results.setdefault(("reference", name), []).append(r)
                print(f"  round {rnd} {'reference':20} {name:37} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  {r['errors']}", flush=True)
        print(f"\n{'median of ' + str(args.rounds):58} {'req/s':>8} {'vs observe':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'p99 vs':>7} {'user us':>8} {'sys us':>7}  errors")
        for label in proxies:
            base = results[(label, "observe")]
            base_rps = statistics.median(r["rps"] for r in base)
            base_p99 = statistics.median(r["p99_ms"] for r in base)
            for name, _, _ in RUNS:
                rs = results[(label, name)]

                def med(key: str) -> float:
                    return statistics.median(r[key] for r in rs)

                errors = sum(1 for r in rs if r["errors"])
                print(f"{label + ', ' + name:58} {med('rps'):8.0f} {med('rps') / base_rps:9.2f}x {med('p50_ms'):7.2f} "
                      f"{med('p99_ms'):7.2f} {med('p99_ms') / base_p99:6.2f}x {med('user_us'):8.1f} "
                      f"{med('sys_us'):7.1f}  {f'{errors} of {len(rs)} runs' if errors else ''}")
            ratios = {name: [r["rps"] / b["rps"] for r, b in zip(results[(label, name)], base)]
                      for name, _, _ in RUNS[1:]}
            print(f"  {label}: per-round ratios to observe (goal >= 0.9x): " + "; ".join(
                f"{name} {' '.join(f'{x:.2f}' for x in xs)}" for name, xs in ratios.items()))
        (keep, keep_name), (two, two_name) = ((results[("reference", n)], n) for n, _ in REFERENCES)
        print(f"reference: {two_name} {statistics.median(r['rps'] for r in two):.0f} req/s, {keep_name} "
              f"{statistics.median(r['rps'] for r in keep):.0f}: "
              f"{statistics.median(a['rps'] / b['rps'] for a, b in zip(two, keep)):.2f}x (what the policy costs nginx)")
    finally:
        for p in proxies.values():
            p.stop()
            p.kill()
        if control is not None:
            control.stop()
            control.kill()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

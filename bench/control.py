"""How fast a mode switch reaches watching sidecars, and what the control plane costs with many watching.

Run: .venv/bin/python bench/control.py [--watchers 100] [--switches 20] [--many 1000]

A real `meshlens control` (SQLite store) with a mesh applied; --watchers simulated
sidecars in this process long-poll `/v1/snapshot` as `proxy/control.py` does (aiohttp,
one connection each, the version they hold). Each of --switches mode switches (a PUT of
the mode) is timed from the PUT until every watcher holds the new version; printed:
p50/p99/max over all watchers and switches (goal: p99 <= 0.5 s). Reference in the same
run: the same number of watchers on a key of a real etcd member (aetcd watches), and a
put, timed the same way (skipped when etcd-server is not installed). Then --many
watchers: the control plane's RSS and CPU while they wait and through 5 switches.
Reported, not asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.control.etcd_cluster import EtcdCluster  # noqa: E402
from tests.control.processes import ControlProcess  # noqa: E402

MESH = "services:\n  web: {}\n  api: {}\n"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def watcher(session: aiohttp.ClientSession, base: str, i: int, seen: dict[int, asyncio.Event],
                  held: list[str], stop: asyncio.Event) -> None:
    """One simulated sidecar: long-poll with the version held; note when each version arrives."""
    while not stop.is_set():
        params = {"service": "web", "instance": f"bench-{i}", "version": held[i], "timeout": "30"}
        try:
            async with session.get(f"{base}/v1/snapshot", params=params) as resp:
                if resp.status == 200:
                    held[i] = (await resp.json())["version"]
                    ev = seen.get(int(held[i]))
                    if ev is not None:
                        ev.counter += 1  # type: ignore[attr-defined]
                        if ev.counter == len(held):  # type: ignore[attr-defined]
                            ev.set()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)


async def switches(base: str, watchers: int, n: int, pid: int | None = None) -> tuple[list[float], dict]:
    """Per switch: seconds until every watcher held the new version."""
    held = ["" for _ in range(watchers)]
    seen: dict[int, asyncio.Event] = {}
    stop = asyncio.Event()
    times: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.ensure_future(watcher(session, base, i, seen, held, stop)) for i in range(watchers)]
        while not all(held):  # every watcher has a first snapshot
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # and is waiting again
        cost = {}
        if pid is not None:
            cost["rss_waiting_mb"] = rss_mb(pid)
            c0, t0 = cpu_s(pid), time.monotonic()
        for k in range(n):
            mode = ("dry-run", "observe")[k % 2]
            async with session.get(f"{base}/v1/status") as resp:
                revision = (await resp.json())["revision"]
            ev = asyncio.Event()
            ev.counter = 0  # type: ignore[attr-defined]
            seen[revision + 1] = ev
            start = time.monotonic()
            async with session.put(f"{base}/v1/modes/web", data=json.dumps({"mode": mode, "reason": "bench"})) as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.wait_for(ev.wait(), 60)
            times.append(time.monotonic() - start)
            await asyncio.sleep(0.2)
        if pid is not None:
            cost["cpu_s_per_switch"] = (cpu_s(pid) - c0) / n
            cost["cpu_cores_meanwhile"] = (cpu_s(pid) - c0) / (time.monotonic() - t0)
            cost["rss_after_mb"] = rss_mb(pid)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return times, cost


async def etcd_reference(url: str, watchers: int, n: int) -> list[float]:
    import aetcd

    host, port = url[len("etcd://"):].split(",")[0].rsplit(":", 1)
    clients = [aetcd.Client(host, int(port)) for _ in range(max(1, watchers // 50))]  # watches share channels
    times = []
    try:
        for k in range(n):
            key = f"/bench/mode/{k}".encode()
            events = [clients[i % len(clients)].watch_once(key, timeout=30) for i in range(watchers)]
            waiting = [asyncio.ensure_future(e) for e in events]
            await asyncio.sleep(0.5)
            start = time.monotonic()
            await clients[0].put(key, b"dry-run")
            await asyncio.gather(*waiting)
            times.append(time.monotonic() - start)
    finally:
        for c in clients:
            await c.close()
    return times


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--watchers", type=int, default=100)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--many", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-control-"))
    control = ControlProcess(tmp / "control").start()
    cluster = None
    try:
        (tmp / "mesh.yaml").write_text(MESH)
        env = {**os.environ, "MESHLENS_CONTROL": control.url}
        subprocess.run([sys.executable, "-m", "meshlens.cli.main", "apply", "-f", str(tmp / "mesh.yaml")],
                       check=True, capture_output=True, env=env)
        print(f"{os.cpu_count()} CPUs; {args.watchers} watchers, {args.switches} mode switches")
        times, _ = asyncio.run(switches(control.url, args.watchers, args.switches))
        print(f"  meshlens control (sqlite): all {args.watchers} watchers hold the new version after "
              f"p50 {statistics.median(times) * 1000:.1f} ms, p99 {pct(times, 99) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms (goal: p99 <= 500 ms)")
        if shutil.which("etcd"):
            cluster = EtcdCluster(tmp / "etcd", members=1).start()
            ref = asyncio.run(etcd_reference(cluster.url, args.watchers, args.switches))
            print(f"  reference, etcd watches on one member: p50 {statistics.median(ref) * 1000:.1f} ms, "
                  f"p99 {pct(ref, 99) * 1000:.1f} ms; meshlens/etcd at p99 {pct(times, 99) / pct(ref, 99):.1f}x")
        else:
            print("  reference skipped: etcd-server is not installed (scripts/install-system.sh)")
        assert control.proc is not None
        times, cost = asyncio.run(switches(control.url, args.many, 5, control.proc.pid))
        print(f"  {args.many} watchers: RSS {cost['rss_waiting_mb']:.1f} MB while they wait, "
              f"{cost['rss_after_mb']:.1f} MB after 5 switches; {cost['cpu_s_per_switch'] * 1000:.0f} ms of CPU "
              f"a switch ({cost['cpu_cores_meanwhile']:.2f} cores meanwhile); the switch reached all of them "
              f"after p50 {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
    finally:
        control.stop()
        control.kill()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

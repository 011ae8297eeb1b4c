"""The recorder's shipping thread against the thread it shares the interpreter with, in the same run as its reference.

Run: .venv/bin/python bench/recorder.py [--rows 5000] [--repeat 7]

Rows are realistic proxy records, built as proxy/server.py `record()` builds them (a copy
of record.DEFAULT_ROW filled by position, record.AT): an outbound sidecar's calls over 16
keep-alive connections, each with its trace context and x-request-id.

(a) Stall: the main thread timestamps time.perf_counter() as fast as it can (an event loop
    that always has work) while a CallRecorder's thread cuts, encodes and ships one batch of
    --rows rows to a sink (a subprocess answering 200, at nice 19 so that it does not take
    the main thread's core); the longest gap between two timestamps is the stall the proxy
    would see. The floor: the same loop while nothing else of ours runs, and while a thread
    wakes every 0.5 ms and does nothing (what any second thread costs the loop: each time
    the lock changes hands, the loop waits for the OS to run the other thread).
    Reference: the encoder this replaced (one json.dumps of the whole batch, as
    collector/client.py did until 2026-12-01, kept below) run in a thread the same way.
(b) Hold: the longest stretch of the recorder thread's CPU time between two releases of the
    lock (its `pause()`, noted), an upper bound of how long it held the lock at a time; for
    the reference, its one json.dumps call.
(c) Cost: CPU time of the recorder's thread (time.thread_time) to cut and encode the batch
    (and gzip it, for a collector elsewhere), in µs a call, with the main thread idle; the
    reference likewise (it gzipped on loopback too).

Each is the best of --repeat runs (the machine is shared); figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from random import getrandbits
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshlens.collector import client  # noqa: E402
from meshlens.collector.record import AT, CALL_COLUMN_NAMES, CALL_COLUMNS, DEFAULT_ROW  # noqa: E402

SINK = textwrap.dedent("""
    import http.server, sys
    class Sink(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Sink)
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")


def proxy_rows(n: int) -> list[tuple[Any, ...]]:
    """`n` outbound records as the sidecar makes them: per-connection constants, per-request ids."""
    rows = []
    for i in range(n):
        request_id = f"{getrandbits(128):032x}"
        row = list(DEFAULT_ROW)
        row[AT.time], row[AT.duration_ns] = time.time_ns(), 300_000 + getrandbits(16)
        row[AT.observer], row[AT.observer_id] = "client", "web-7d9f-x2k4:4242"
        row[AT.trace_id], row[AT.span_id] = f"{getrandbits(128):032x}", f"{getrandbits(64):016x}"
        row[AT.src_service], row[AT.src_instance] = "web", "web-7d9f-x2k4:4242"
        row[AT.src_addr], row[AT.src_port] = "127.0.0.1", 40_000 + i % 16
        row[AT.dst_service] = "backend"
        row[AT.dst_subset], row[AT.dst_addr], row[AT.dst_port] = "v1", "10.0.3.17", 8080
        # decoded per request by the proxy: equal strings, not the same objects
        row[AT.protocol], row[AT.method], row[AT.authority], row[AT.path] = (
            "http/1.1", b"GET".decode("ascii"), b"backend:8080".decode("latin-1"), b"/api/items".decode("latin-1"))
        row[AT.status], row[AT.request_bytes], row[AT.response_bytes] = 200, 0, 612
        row[AT.error], row[AT.mode] = "", "observe"
        row[AT.attributes] = {"x_request_id": f"{request_id[:8]}-{request_id[8:12]}-4{request_id[13:16]}-"
                                               f"a{request_id[17:20]}-{request_id[20:]}"}
        rows.append(tuple(row))
    return rows


# -- the reference: the encoder before 2026-12-01 --------------------------------------------

_DEFAULTS = {c.name: c.default() for c in CALL_COLUMNS}


def encode_before(rows: list[tuple[Any, ...]]) -> tuple[bytes, float]:
    """Transpose, leave out the all-default columns, one json.dumps, gzip: what the thread did, in one go.

    Also the CPU time of the json.dumps call, one C call: the least the lock was held for at a stretch."""
    columns = dict(zip(CALL_COLUMN_NAMES, map(list, zip(*rows))))
    kept = {}
    for name, values in columns.items():
        default = _DEFAULTS[name]
        if values.count(default) == len(values):
            kind = type(default)
            if kind is str or kind is dict or set(map(type, values)) == {kind}:
                continue
        kept[name] = values
    t0 = time.thread_time()
    body = json.dumps({"v": 1, "n": len(rows), "columns": kept}, separators=(",", ":")).encode()
    held = time.thread_time() - t0
    return gzip.compress(body, compresslevel=1), held


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Run:
    stall_s: float = float("nan")  # the main loop's longest gap (contended runs)
    us_per_call: float = 0.0  # the thread's CPU for the cut, encode (and gzip)
    longest_hold_s: float = 0.0  # the thread's CPU between two releases of the lock, at most
    body_bytes: int = 0


def longest_gap(done: Callable[[], bool]) -> float:
    """Timestamp as fast as possible until done(); the longest gap between two timestamps, in seconds."""
    clock = time.perf_counter
    last = clock()
    worst = 0.0
    while not done():
        now = clock()
        if now - last > worst:
            worst = now - last
        last = now
    return worst


_released: list[float] = []  # the recorder thread's CPU clock at each release of the lock
_pause = client.pause


def noted_pause() -> None:
    _released.append(time.thread_time())
    _pause()


client.pause = noted_pause  # the recorder's own pause, noted: where its thread lets go of the lock


class TimedRecorder(client.CallRecorder):
    """The real recorder, noting the CPU time its thread spends on each cut, and between its releases."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.run = Run()
        self.calls = 0
        super().__init__(*args, **kw)

    def _cut(self, n: int) -> None:
        _released.clear()
        t0 = time.thread_time()
        super()._cut(n)
        t1 = time.thread_time()
        marks = [t0, *_released, t1]
        self.run.us_per_call += (t1 - t0) * 1e6
        self.run.longest_hold_s = max(self.run.longest_hold_s, max(b - a for a, b in zip(marks, marks[1:])))
        self.run.body_bytes += self._unsent[-1].size
        self.calls += n


def recorder_run(url: str, rows: list[tuple[Any, ...]], contended: bool, compress: bool) -> Run:
    """One batch through a real recorder, to the sink."""
    rec = TimedRecorder(url, batch_rows=len(rows), flush_interval=3600, compress=compress)
    try:
        for r in rows[:-1]:
            rec.record(r)
        rec.record(rows[-1])  # the batch_rows-th call wakes the shipping thread
        if contended:
            rec.run.stall_s = longest_gap(lambda: rec.sent_calls >= len(rows))
        while rec.sent_calls < len(rows):
            time.sleep(0.01)
        assert not any(rec.dropped.values()), rec.dropped
        rec.run.us_per_call /= rec.calls
        return rec.run
    finally:
        rec.close(timeout=1)


def reference_run(rows: list[tuple[Any, ...]], contended: bool) -> Run:
    run = Run()
    go = threading.Event()

    def work() -> None:
        go.wait()  # once the main loop runs: a stall before it would go unseen
        t0 = time.thread_time()
        body, run.longest_hold_s = encode_before(rows)
        run.us_per_call = (time.thread_time() - t0) / len(rows) * 1e6
        run.body_bytes = len(body)

    t = threading.Thread(target=work)
    t.start()
    go.set()
    if contended:
        run.stall_s = longest_gap(lambda: not t.is_alive())
    t.join()
    return run


def floor_run(seconds: float = 0.3, waking_thread: bool = False) -> float:
    """The loop's longest gap with nothing else of ours running, or with a thread that takes the
    interpreter lock for a moment every 0.5 ms: what any second thread costs the loop through the
    OS (each handover waits for a thread to be scheduled), without doing any work."""
    end = time.perf_counter() + seconds
    if not waking_thread:
        return longest_gap(lambda: time.perf_counter() >= end)

    def wake_until_end() -> None:
        while time.perf_counter() < end:
            time.sleep(0.0005)

    t = threading.Thread(target=wake_until_end)
    t.start()
    gap = longest_gap(lambda: time.perf_counter() >= end)
    t.join()
    return gap


VARIANTS: dict[str, Callable[[str, list[tuple[Any, ...]], bool], Run]] = {
    "before: one json.dumps + gzip a batch": lambda url, rows, contended: reference_run(rows, contended),
    "after, collector on loopback (no gzip)": lambda url, rows, contended: recorder_run(url, rows, contended, False),
    "after, collector elsewhere (gzip)": lambda url, rows, contended: recorder_run(url, rows, contended, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    # The sink stands for a collector on another machine: at nice 19 it does not take the main thread's core.
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 19))
    try:
        assert sink.stdout is not None
        url = f"http://127.0.0.1:{int(sink.stdout.readline())}/v1/calls"
        rows = proxy_rows(args.rows)
        floors: dict[str, list[float]] = {"floor: the loop alone": [], "floor: a thread waking every 0.5 ms": []}
        runs: dict[str, list[Run]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeat):  # alternating, so that the machine's mood hits every variant alike
            floors["floor: the loop alone"].append(floor_run())
            floors["floor: a thread waking every 0.5 ms"].append(floor_run(waking_thread=True))
            for name, variant in VARIANTS.items():
                stall = variant(url, rows, True).stall_s
                runs[name].append(variant(url, rows, False))  # cost, hold and size with the main thread idle
                runs[name][-1].stall_s = stall
        print(f"{args.rows} proxy rows a batch; best (median) of {args.repeat}; switch interval "
              f"{sys.getswitchinterval() * 1e3:g} ms; slices of {client.SLICE_ROWS} rows")
        print(f"{'':40} {'longest stall ms':>17} {'longest hold ms':>16} {'thread µs/call':>15} {'bytes/call':>11}")
        for name, gaps in floors.items():
            print(f"{name:40} {_fig(gaps, 1e3):>17}")
        for name, done in runs.items():
            print(f"{name:40} {_fig([r.stall_s for r in done], 1e3):>17} "
                  f"{_fig([r.longest_hold_s for r in done], 1e3):>16} {_fig([r.us_per_call for r in done]):>15} "
                  f"{done[-1].body_bytes / args.rows:11.1f}")
    finally:
        sink.terminate()
        sink.wait(10)


def _fig(values: list[float], scale: float = 1.0) -> str:
    ordered = sorted(values)
    return f"{ordered[0] * scale:.2f} ({ordered[len(ordered) // 2] * scale:.2f})"


if __name__ == "__main__":
    main()

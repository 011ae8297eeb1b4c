"""`meshlens tap`: passive capture (live interface or pcap/pcapng file) into call records."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from meshlens.cli.errors import UserError, bad_collector_url
from meshlens.cli.progress import ProgressLine

if TYPE_CHECKING:
    from meshlens.tap.output import FileSink

DEFAULT_COLLECTOR = "http://127.0.0.1:4318/v1/calls"
# Reading a file, the tap waits for the collector client rather than drop calls
# once this many are buffered (a live capture cannot wait: it drops and counts).
BACKPRESSURE_ROWS = 50_000

EPILOG = """examples:
  meshlens tap --iface eth0 --filter "tcp port 80 or tcp port 443" --mesh mesh.yaml
  meshlens tap --pcap capture.pcapng --out calls.parquet
  meshlens tap --pcap capture.pcap --collector http://10.0.0.9:4318/v1/calls

calls are recorded with observer 'wire'; without --out they go to the collector
(default http://127.0.0.1:4318/v1/calls). Live capture needs root or CAP_NET_RAW;
on 'lo' every packet is seen twice and counted once."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tap", help="record calls from a live interface or a pcap file, passively",
                       description="Passive tap: HTTP/1.1, TLS, h2 and TCP calls from a live interface or a "
                                   "pcap/pcapng file, with names (and declared protocols) from the mesh definition.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--iface", help="capture live on this interface (AF_PACKET)")
    src.add_argument("--pcap", metavar="FILE", help="read a pcap or pcapng file")
    p.add_argument("--filter", metavar="BPF", help="kernel BPF filter for --iface (tcpdump syntax)")
    p.add_argument("--mesh", metavar="MESH_YAML",
                   help="mesh definition that names services (default: none, ip:port); a service's protocol "
                        "(http, tcp, tls) there replaces detection for connections to its instances")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--collector", metavar="URL", default=None,
                     help=f"collector call endpoint (default {DEFAULT_COLLECTOR})")
    out.add_argument("--out", metavar="FILE", help="write calls to FILE.parquet or FILE.csv instead")
    p.add_argument("--tap-id", help="observer id of this tap (default HOST/IFACE or HOST/pcap)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with --pcap: N processes, each taking a share of the connections (default 1)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop a live capture after this long")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(run=run)


class _Progress:
    """The tap's progress on stderr, at most every `interval` seconds."""

    def __init__(self, enabled: bool, interval: float = 1.0) -> None:
        self.enabled = enabled
        self.line = ProgressLine(sys.stderr)
        self.interval = interval
        self._next = time.monotonic() + interval

    def due(self) -> bool:
        if not self.enabled:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def show(self, text: str) -> None:
        self.line.show(text)

    def done(self) -> None:
        self.line.done()


def run(args: argparse.Namespace) -> int:
    mesh = None
    if args.mesh:
        from meshlens.mesh import MeshError, load
        try:
            mesh = load(args.mesh)
        except MeshError as e:
            raise UserError(str(e)) from None
    if args.filter and not args.iface:
        raise UserError("--filter applies to --iface (a pcap file is read whole)")
    tap_id = args.tap_id or f"{socket.gethostname()}/{args.iface or 'pcap'}"

    capture = reader = None
    if args.pcap:
        from meshlens.tap.pcapfile import PcapError, PcapReader
        try:
            reader = PcapReader(args.pcap)
        except PcapError as e:
            raise UserError(str(e)) from None
    if args.iface:  # open the socket before any output exists: its errors are the likeliest
        from meshlens.tap.capture import CaptureError, LiveCapture
        try:
            capture = LiveCapture(args.iface, args.filter)
        except CaptureError as e:
            raise UserError(str(e)) from None

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.workers > 1 and not args.pcap:
        raise UserError("--workers applies to --pcap (a live capture is one process)")
    if args.duration is not None and not args.iface:
        raise UserError("--duration applies to --iface")
    if args.out and os.path.splitext(args.out)[1].lower() not in (".parquet", ".csv"):
        raise UserError(f"--out must end in .parquet or .csv, not {args.out!r}")
    if args.pcap and args.workers > 1:
        reader.close()
        s, error, unsent, out_fields = _pcap_sharded(args, mesh, tap_id)
        capture = None
    else:
        s, error, unsent, out_fields = _one_process(args, mesh, tap_id, reader, capture)
    fields = [f"packets={s['packets']}", f"connections={s['connections']}", f"calls={s['calls']}",
              f"incomplete={s['incomplete_calls']}", f"gaps={s['gaps']}"]
    if capture is not None:
        fields += [f"kernel_received={capture.kernel_received}", f"kernel_dropped={capture.kernel_dropped}"]
    summary = " ".join(fields + out_fields)
    if error or unsent:  # one line: what went wrong, then what was done before it
        problem = "; ".join(p for p in (error, unsent) if p)
        if not s["packets"]:
            raise UserError(problem)
        if error:
            raise UserError(f"{problem} ({s['calls']} calls read before it were kept: {summary})")
        raise UserError(f"{problem}; {summary}")
    print("meshlens tap: " + summary, file=sys.stderr)
    return 0


def _open_output(args: argparse.Namespace, out: str | None) -> tuple[FileSink | None, Any, Any]:
    """(file sink or None, collector recorder or None, the function calls go to)."""
    if out:
        from meshlens.tap.output import FileSink
        try:
            sink = FileSink(out)
        except ValueError as e:
            raise UserError(str(e)) from None
        return sink, None, sink.record
    from meshlens.collector.client import CallRecorder
    try:
        recorder = CallRecorder(args.collector or DEFAULT_COLLECTOR)
    except ValueError as e:
        raise bad_collector_url(args.collector or DEFAULT_COLLECTOR, e) from None
    if not args.pcap:
        return None, recorder, recorder.record

    def record(call: Any, _plain: Any = recorder.record, _r: Any = recorder) -> None:
        # offline: wait for the shipper rather than drop, counting what is cut but not yet
        # acknowledged too (while the collector is away, calls wait there, not in the buffer)
        while _r.buffered + _r.unsent_calls >= BACKPRESSURE_ROWS:
            time.sleep(0.005)
        _plain(call)
    return None, recorder, record


def _one_process(args: argparse.Namespace, mesh: Any, tap_id: str, reader: Any, capture: Any,
                 out: str | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[dict, str, str, list[str]]:
    """Run the tap; (summary, reader error, output error, output fields of the summary line)."""
    import gc

    from meshlens.tap.calls import Tap

    sink, recorder, record = _open_output(args, out if out is not None else args.out)
    tap = Tap(record, mesh=mesh, observer_id=tap_id, shard=shard)
    progress = _Progress(not args.no_progress and shard[0] == 0)
    error = ""
    gc.freeze()  # what exists now is long-lived; the young calls die fast
    try:
        if capture is not None:
            error = _live(tap, capture, args, progress)
        else:
            error = _pcap(tap, reader, progress)
    finally:
        progress.done()
        unsent = _close_output(sink, recorder)
    out_fields = ([f"written={sink.written}", f"file={args.out}"] if sink else
                  [f"sent={recorder.sent_calls}", f"dropped={sum(recorder.dropped.values())}"])
    return tap.summary(), error, unsent, out_fields


def _shard_worker(args: argparse.Namespace, mesh: Any, tap_id: str, shard: tuple[int, int], part: str | None,
                  results: Any) -> None:
    from meshlens.tap.pcapfile import PcapError, PcapReader

    try:
        reader = PcapReader(args.pcap)
        results.put((shard[0], *_one_process(args, mesh, tap_id, reader, None, part, shard)))
    except (UserError, PcapError) as e:
        results.put((shard[0], {}, "", str(e), []))


def _pcap_sharded(args: argparse.Namespace, mesh: Any, tap_id: str) -> tuple[dict, str, str, list[str]]:
    """`--workers N` over a file: N processes read it, each keeps its share of the connections."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    n = args.workers
    parts = [f"{args.out}.part{i}{os.path.splitext(args.out)[1]}" if args.out else None for i in range(n)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_shard_worker, args=(args, mesh, tap_id, (i, n), parts[i], results), daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    got.sort(key=lambda r: r[0])
    unsent = "; ".join(dict.fromkeys(r[3] for r in got if r[3]))
    total: dict[str, int] = {}
    for _, summary, _, _, _ in got:
        for k, v in summary.items():
            # every worker reads (and decodes) every packet: those counters are per file, not per share
            total[k] = max(total.get(k, 0), v) if k in ("packets", "tcp_segments", "skipped_frames") \
                else total.get(k, 0) + v
    for k in ("packets", "connections", "calls", "incomplete_calls", "gaps"):
        total.setdefault(k, 0)
    error = got[0][2]
    if args.out:
        from meshlens.tap.output import merge_parts
        written = merge_parts(args.out, [p for p in parts if p and os.path.exists(p)])
        out_fields = [f"written={written}", f"file={args.out}"]
    else:
        out_fields = [f"sent={sum(int(f.split('=')[1]) for r in got for f in r[4] if f.startswith('sent='))}",
                      f"dropped={sum(int(f.split('=')[1]) for r in got for f in r[4] if f.startswith('dropped='))}"]
    return total, error, unsent, out_fields


def _pcap(tap: Any, reader: Any, progress: _Progress) -> str:
    from meshlens.tap.pcapfile import PcapError

    feed, path = tap.feed, reader.name
    try:
        size = os.path.getsize(path) or 1
    except OSError:
        size = 1
    error = ""
    with reader:
        try:
            n = 0
            for t_ns, linktype, frame in reader:
                feed(t_ns, linktype, frame)
                n += 1
                if not n & 0x3FFF and progress.due():
                    progress.show(f"reading {path}: {100 * reader.offset // size}% packets={n} "
                                  f"calls={tap.stats.calls}")
        except PcapError as e:
            error = str(e)
    tap.finish()
    return error


def _live(tap: Any, capture: Any, args: argparse.Namespace, progress: _Progress) -> str:
    from meshlens.tap.capture import run_live

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())

    def show() -> None:
        if progress.due():
            progress.show(f"capturing on {capture.iface}: packets={tap.stats.packets} calls={tap.stats.calls} "
                          f"open={len(tap.calls)} kernel_dropped={capture.kernel_dropped}")

    print(f"meshlens tap capturing iface={capture.iface} linktype={capture.linktype}", file=sys.stderr, flush=True)
    try:
        run_live(tap, capture, stop, duration=args.duration, progress=show)
    finally:
        capture.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ""


def _close_output(sink: FileSink | None, recorder: Any) -> str:
    """Write or ship what is left; '' or why some calls did not get out."""
    if sink is not None:
        sink.close()
        return ""
    ok = recorder.flush(timeout=30.0)
    left = recorder.buffered + recorder.unsent_calls
    recorder.close(timeout=1.0)
    if not ok:
        return f"the collector at {recorder.url} did not take {left or 'some'} calls (is it running?)"
    return ""

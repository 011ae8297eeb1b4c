"""`meshlens demo`: the whole story on one machine — a small shop with faults, recorded, then recommendations."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from meshlens.cli.argtypes import port, positive
from meshlens.cli.errors import UserError
from meshlens.config import data_home

DEFAULT_DURATION = 180.0
DEFAULT_RATE = 40.0
MAX_RATE = 100.0  # the machine also runs ~16 processes of the demo; beyond this the demo measures itself

EPILOG = """examples:
  meshlens demo
      3 minutes of traffic into a fresh embedded store under ~/.local/share/meshlens/demo/,
      collector on 4318 (OTLP/HTTP), 4317 (OTLP/gRPC) and 8123 (queries), then the recommendations
  meshlens demo --duration 60 --any-ports --store chdb:/tmp/demo-store
      one minute (enough for every recommendation), free ports, a chosen store directory
  meshlens demo --keep-running
      after the recommendations, keep the collector serving queries (Grafana, notebooks) until Ctrl-C

what runs: the collector; frontend, catalog, cart, payment and three inventory instances
(aiohttp, OpenTelemetry-instrumented), each behind its own `meshlens proxy` sidecar;
shoppers through an ingress sidecar; a legacy `reports` job calling catalog with no sidecar;
`meshlens tap` on lo when this user may capture (root or CAP_NET_RAW).
faults: payment has a slow tail, inventory-3 answers 503 now and then, and catalog's
GET /items/{id}/reviews always fails. Ctrl-C stops everything; no process is left behind."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a sample shop behind sidecars, with faults, and show the recommendations",
                       description="Run the collector, a small shop of instrumented services behind sidecars, the "
                                   "tap and a load with known faults; show what each observer recorded, then the "
                                   "recommendations that name the faults.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=positive("seconds"), default=DEFAULT_DURATION, metavar="SECONDS",
                   help=f"seconds of load (default {DEFAULT_DURATION:g}; 60 is enough for every recommendation)")
    p.add_argument("--store", metavar="chdb:PATH",
                   help="embedded store directory (default: a new one, ~/.local/share/meshlens/demo/TIMESTAMP, kept)")
    p.add_argument("--rate", type=positive("requests/s"), default=DEFAULT_RATE, metavar="N",
                   help=f"shopper requests per second (default {DEFAULT_RATE:g}, at most {MAX_RATE:g}); "
                        "lower rates need a longer --duration")
    p.add_argument("--otlp-http-port", type=port(0), default=4318, metavar="PORT", help="OTLP/HTTP (default 4318)")
    p.add_argument("--otlp-grpc-port", type=port(0), default=4317, metavar="PORT", help="OTLP/gRPC (default 4317)")
    p.add_argument("--query-port", type=port(0), default=8123, metavar="PORT",
                   help="ClickHouse HTTP query endpoint (default 8123)")
    p.add_argument("--any-ports", action="store_true",
                   help="free ports for the collector too (when another collector runs, and in tests)")
    p.add_argument("--no-tap", action="store_true", help="no wire observer, even when capture is permitted")
    p.add_argument("--keep-running", action="store_true",
                   help="after the recommendations, keep the collector serving queries until Ctrl-C")
    p.set_defaults(run=run)


def default_store_path() -> Path:
    """A fresh directory per run under the user's data dir: kept, so notebooks can reopen it later."""
    return data_home() / "demo" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def store_path(url: str | None) -> Path:
    """The directory of a `chdb:PATH` store URL (or a bare path); the demo runs on the embedded store only."""
    if url is None:
        return default_store_path()
    if "://" in url:
        raise UserError(f"--store must be chdb:PATH (the demo runs its own embedded store), got {url!r}")
    path = Path(url[len("chdb:"):] if url.startswith("chdb:") else url).expanduser()
    if not str(path):
        raise UserError("--store chdb:PATH needs a path")
    if path.exists() and not path.is_dir():
        raise UserError(f"--store {path} is a file, not a directory")
    return path.resolve()


def run(args: argparse.Namespace) -> int:
    from meshlens.demo.run import Demo, DemoConfig
    from meshlens.demo.supervisor import ChildFailed

    if args.rate > MAX_RATE:
        raise UserError(f"--rate is at most {MAX_RATE:g} requests/s, got {args.rate:g}")
    ports = (0, 0, 0) if args.any_ports else (args.otlp_http_port, args.otlp_grpc_port, args.query_port)
    cfg = DemoConfig(duration=args.duration, store_path=store_path(args.store), otlp_http_port=ports[0],
                     otlp_grpc_port=ports[1], query_port=ports[2], rate=args.rate, tap=not args.no_tap,
                     keep_running=args.keep_running)
    try:
        return Demo(cfg).run()
    except ChildFailed as e:
        raise UserError(str(e)) from None

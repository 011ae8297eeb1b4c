"""`meshlens demo`: the whole story on one machine — a small shop with faults observed, the recommendations
tried in dry-run, enforced under a guard, measured before and after, then mTLS."""
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
      3 minutes into a fresh embedded store under ~/.local/share/meshlens/demo/: observe 60s,
      dry-run 30s, enforce 60s, mTLS 30s; collector on 4318 (OTLP/HTTP), 4317 (OTLP/gRPC) and
      8123 (queries), control plane and its console on 15010
  meshlens demo --duration 60 --any-ports --store chdb:/tmp/demo-store
      one minute (observe 45s, enough for every recommendation; the other phases short), free ports,
      a chosen store directory
  meshlens demo --keep-running
      at the end, keep the collector (Grafana, notebooks) and the control plane (its console, the
      history of every change) up until Ctrl-C

the story: observe (every call recorded, the three faults visible, then the recommendations);
`meshlens recommend --apply` puts them in dry-run, and `meshlens dryrun report` says what they
would have done; inventory and payment (cart's calls) go to enforce with
`meshlens mode set S enforce --guard`, and the shoppers' failure rate and p99 are measured before
and after; `meshlens mtls readiness` names the caller that blocks STRICT for catalog, the
readiness gate refuses it there, and STRICT on payment leaves cart's identity on every call.
--duration scales the phases.

what runs: the collector; the control plane (the mesh's CA, reading the calls for its gate and
guards); frontend, catalog, cart, payment and three inventory instances (aiohttp,
OpenTelemetry-instrumented), each behind its own `meshlens proxy` sidecar following the control
plane, mTLS between them; shoppers through an ingress sidecar; a legacy `reports` job calling
catalog with no sidecar; `meshlens tap` on lo when this user may capture (root or CAP_NET_RAW).
faults: payment has a slow tail, inventory-3 answers 503 now and then (in runs), and catalog's
GET /items/{id}/reviews always fails. Ctrl-C stops everything; no process is left behind."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a sample shop behind sidecars, with faults: observe, recommend, dry-run, "
                                    "enforce, mTLS",
                       description="Run the collector, the control plane, a small shop of instrumented services "
                                   "behind sidecars, the tap and a load with known faults; observe it, store the "
                                   "recommendations as dry-run, enforce them under a guard, measure the shoppers' "
                                   "failures and p99 before and after, then turn STRICT mTLS on where no one breaks.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=positive("seconds"), default=DEFAULT_DURATION, metavar="SECONDS",
                   help=f"seconds of load, shared by the four phases (default {DEFAULT_DURATION:g}; 60 is the shortest "
                        "that gives every recommendation)")
    p.add_argument("--store", metavar="chdb:PATH",
                   help="embedded store directory (default: a new one, ~/.local/share/meshlens/demo/TIMESTAMP, kept)")
    p.add_argument("--rate", type=positive("requests/s"), default=DEFAULT_RATE, metavar="N",
                   help=f"shopper requests per second (default {DEFAULT_RATE:g}, at most {MAX_RATE:g}); "
                        "lower rates need a longer --duration")
    p.add_argument("--otlp-http-port", type=port(0), default=4318, metavar="PORT", help="OTLP/HTTP (default 4318)")
    p.add_argument("--otlp-grpc-port", type=port(0), default=4317, metavar="PORT", help="OTLP/gRPC (default 4317)")
    p.add_argument("--query-port", type=port(0), default=8123, metavar="PORT",
                   help="ClickHouse HTTP query endpoint (default 8123)")
    p.add_argument("--control-port", type=port(0), default=15010, metavar="PORT",
                   help="the control plane and its console (default 15010)")
    p.add_argument("--any-ports", action="store_true",
                   help="free ports for the collector and the control plane too (when others run, and in tests)")
    p.add_argument("--no-tap", action="store_true", help="no wire observer, even when capture is permitted")
    p.add_argument("--keep-running", action="store_true",
                   help="at the end, keep the collector serving queries and the control plane its console until "
                        "Ctrl-C")
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
    ports = (0, 0, 0, 0) if args.any_ports else (args.otlp_http_port, args.otlp_grpc_port, args.query_port,
                                                 args.control_port)
    cfg = DemoConfig(duration=args.duration, store_path=store_path(args.store), otlp_http_port=ports[0],
                     otlp_grpc_port=ports[1], query_port=ports[2], control_port=ports[3], rate=args.rate,
                     tap=not args.no_tap, keep_running=args.keep_running)
    try:
        return Demo(cfg).run()
    except ChildFailed as e:
        raise UserError(str(e)) from None

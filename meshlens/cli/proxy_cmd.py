"""`meshlens proxy`: run one sidecar (inbound, outbound, admin, metrics) next to one application."""
from __future__ import annotations

import argparse

from meshlens.cli.errors import UserError

EPILOG = """examples:
  meshlens proxy --service catalog --mesh mesh.yaml --app-port 8080
      inbound 0.0.0.0:15006 -> 127.0.0.1:8080, outbound 127.0.0.1:15001,
      admin 127.0.0.1:15000 (/healthz /stats /config), metrics 127.0.0.1:15090 (/stats/prometheus)
  HTTP_PROXY=http://127.0.0.1:15001 curl http://inventory/items
      the application's calls: forward-proxy form, or plain requests with Host: inventory
  meshlens proxy --service web --mesh mesh.yaml --collector http://10.0.0.9:4318/v1/calls
  meshlens proxy --service web --mesh mesh.yaml --inbound-port 0 --outbound-port 0 --app-port 8080
      port 0 picks a free port; the ready line on stdout names the ports bound

every exchange is recorded as a call (observer client on outbound, server on inbound)
and shipped to the collector; --no-record turns that off. SIGTERM drains: in-flight
requests finish (up to --drain-timeout), new connections are refused, then it exits."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="run a sidecar proxy that records every call",
                       description="Run one sidecar proxy next to one application instance: HTTP/1.1 "
                                   "inbound and outbound listeners that record every exchange as a call.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0 = any free port, -1 = off), got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from collector.client import DEFAULT_URL
    from proxy.downstream import HEADER_TIMEOUT, IDLE_TIMEOUT
    from proxy.server import DRAIN_TIMEOUT

    p.add_argument("--service", required=True, help="this sidecar's service, as named in the mesh file")
    p.add_argument("--mesh", required=True, metavar="FILE", help="mesh definition (mesh.yaml)")
    p.add_argument("--inbound-port", type=_port, default=15006, help="inbound listener (default 15006)")
    p.add_argument("--outbound-port", type=_port, default=15001, help="outbound listener (default 15001)")
    p.add_argument("--admin-port", type=_port, default=15000, help="admin: /healthz /stats /config (default 15000)")
    p.add_argument("--metrics-port", type=_port, default=15090, help="Prometheus metrics (default 15090)")
    p.add_argument("--app-port", type=_port, default=None,
                   help="the local application's port; inbound is off without it")
    p.add_argument("--collector", default=DEFAULT_URL, metavar="URL",
                   help=f"where call records go (default {DEFAULT_URL})")
    p.add_argument("--no-record", action="store_true", help="do not record calls (metrics are still kept)")
    p.add_argument("--header-timeout", type=_seconds, default=HEADER_TIMEOUT,
                   help=f"seconds for a whole request head once it started (default {HEADER_TIMEOUT:g}); 408 after")
    p.add_argument("--idle-timeout", type=_seconds, default=IDLE_TIMEOUT,
                   help=f"close client connections idle this long (default {IDLE_TIMEOUT:g})")
    p.add_argument("--drain-timeout", type=_seconds, default=DRAIN_TIMEOUT,
                   help=f"seconds in-flight requests get after SIGTERM (default {DRAIN_TIMEOUT:g})")


def run(args: argparse.Namespace) -> int:
    from collector.client import CallRecorder
    from meshlens.mesh import MeshError, load
    from proxy.server import ProxyConfig, run as run_proxy

    try:
        mesh = load(args.mesh)
        mesh.service(args.service)
    except MeshError as e:
        raise UserError(str(e)) from None
    recorder = None
    if not args.no_record:
        try:
            recorder = CallRecorder(args.collector)
        except ValueError as e:
            raise UserError(str(e)) from None
    config = ProxyConfig(service=args.service, mesh=mesh, inbound_port=args.inbound_port,
                         outbound_port=args.outbound_port, admin_port=args.admin_port,
                         metrics_port=args.metrics_port, app_port=args.app_port,
                         header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                         drain_timeout=args.drain_timeout)
    try:
        run_proxy(config, recorder)
    except OSError as e:
        raise UserError(f"cannot listen: {e.strerror or e}") from None
    return 0

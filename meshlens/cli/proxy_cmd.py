"""`meshlens proxy`: run one sidecar (inbound, outbound, admin, metrics) next to one application;
`meshlens proxy-iptables`: the rules that send the application's traffic through it transparently."""
from __future__ import annotations

import argparse
import os

from meshlens.cli.argtypes import port, positive
from meshlens.cli.errors import UserError, bad_collector_url

EPILOG = """examples:
  meshlens proxy --service catalog --mesh mesh.yaml --app-port 8080
      inbound 0.0.0.0:15006 -> 127.0.0.1:8080, outbound 127.0.0.1:15001,
      admin 127.0.0.1:15000 (/healthz /stats /config), metrics 127.0.0.1:15090 (/stats/prometheus)
  HTTP_PROXY=http://127.0.0.1:15001 curl http://inventory/items
      the application's calls: forward-proxy form, or plain requests with Host: inventory
  meshlens proxy --service web --mesh mesh.yaml --collector http://10.0.0.9:4318/v1/calls
  meshlens proxy --service web --mesh mesh.yaml --inbound-port 0 --outbound-port 0 --app-port 8080
      port 0 picks a free port; the ready line on stdout names the ports bound
  meshlens proxy --service web --control http://127.0.0.1:15010 --app-port 8080
      the mesh from the control plane (`meshlens control`), applied as it changes; `meshlens status`
      shows what each sidecar applied

a service's `protocol` in the mesh file replaces detection: inbound for this service, outbound
(transparent mode) for the service at the original destination. tcp: tunnelled, never parsed;
tls: tunnelled, its hellos recorded; http: parsed as HTTP/1.1, anything else answered 400.

every exchange is recorded as a call (observer client on outbound, server on inbound)
and shipped to the collector; --no-record turns that off. SIGTERM drains: in-flight
requests finish (up to --drain-timeout), new connections are refused, then it exits.

transparent mode (see `meshlens proxy-iptables --help`): the application's TCP is
redirected to the outbound listener by iptables, and the proxy sends each connection
where the application meant it to go (SO_ORIGINAL_DST). The proxy must then run as the
uid or gid the rules exempt (1337 by default, as Istio's), or its own upstream
connections would be redirected back into it; it needs no root:
  setpriv --reuid 1337 --regid 1337 --clear-groups meshlens proxy --service web --mesh mesh.yaml --app-port 8080"""

IPTABLES_EPILOG = """examples:
  meshlens proxy-iptables --print --app-port 8080
      show the iptables commands, change nothing
  meshlens proxy-iptables --apply --app-port 8080 --exclude-port 22 --exclude-port 4318
      outgoing TCP -> 127.0.0.1:15001 except from uid/gid 1337 (the proxy), loopback and
      ports 22 and 4318 (ssh, the collector); incoming TCP to 8080 -> :15006
  meshlens proxy-iptables --remove
      delete the MESHLENS_OUTPUT and MESHLENS_INBOUND chains and the jumps to them

rules go in the nat table, in chains of their own (MESHLENS_OUTPUT from OUTPUT,
MESHLENS_INBOUND from PREROUTING); --apply is idempotent and leaves other chains alone.
Needs root or CAP_NET_ADMIN in the network namespace (a pod, or `ip netns exec NS ...`).
IPv4 only for now."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="run a sidecar proxy that records every call",
                       description="Run one sidecar proxy next to one application instance: inbound and "
                                   "outbound listeners that pass traffic through (HTTP/1.1 parsed; TLS, HTTP/2 "
                                   "and other TCP tunnelled, as detected from each connection's first bytes or "
                                   "as the mesh file's `protocol` declares) and record every exchange as a call.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(run=run)
    t = sub.add_parser("proxy-iptables", help="print, apply or remove the iptables rules of transparent mode",
                       description="The iptables rules that redirect an application's TCP through its sidecar "
                                   "(Istio-style REDIRECT; the proxy recovers the original destination).",
                       epilog=IPTABLES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_iptables_arguments(t)
    t.set_defaults(run=run_iptables)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from meshlens.collector.client import DEFAULT_URL
    from meshlens.proxy.downstream import HEADER_TIMEOUT, IDLE_TIMEOUT
    from meshlens.proxy.server import DRAIN_TIMEOUT

    p.add_argument("--service", required=True, help="this sidecar's service, as named in the mesh file")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mesh", metavar="FILE",
                        help="mesh definition (mesh.yaml): services, instances, subsets, and each service's protocol "
                             "(http, tcp or tls) where it should not be detected; mode is observe (nothing is enforced "
                             "yet)")
    source.add_argument("--control", metavar="URL", default=os.environ.get("MESHLENS_CONTROL"),
                        help="take the mesh from the control plane instead (default: MESHLENS_CONTROL), kept up to "
                             "date by long polling; started from the last snapshot kept when it cannot be reached")
    p.add_argument("--control-token", metavar="TOKEN", default=os.environ.get("MESHLENS_CONTROL_TOKEN"),
                   help="this sidecar's bearer token for the control plane (default: MESHLENS_CONTROL_TOKEN)")
    p.add_argument("--control-ca", metavar="PEM", default=os.environ.get("MESHLENS_CONTROL_CA"),
                   help="CA an https control plane's certificate is checked against (default: MESHLENS_CONTROL_CA)")
    p.add_argument("--snapshot-cache", metavar="FILE", default=None,
                   help="where the last snapshot that applied is kept (default: "
                        "~/.local/share/meshlens/proxy/SERVICE.snapshot.json)")
    p.add_argument("--inbound-port", type=port(-1), default=15006, help="inbound listener (default 15006)")
    p.add_argument("--outbound-port", type=port(-1), default=15001, help="outbound listener (default 15001)")
    p.add_argument("--admin-port", type=port(-1), default=15000, help="admin: /healthz /stats /config (default 15000)")
    p.add_argument("--metrics-port", type=port(-1), default=15090, help="Prometheus metrics (default 15090)")
    p.add_argument("--inbound-host", default="0.0.0.0", metavar="ADDR",
                   help="address of the inbound listener (default 0.0.0.0: other services' sidecars reach it; "
                        "127.0.0.1 keeps it on this machine)")
    p.add_argument("--app-port", type=port(-1), default=None,
                   help="the local application's port; inbound is off without it")
    p.add_argument("--collector", default=DEFAULT_URL, metavar="URL",
                   help=f"where call records go (default {DEFAULT_URL})")
    p.add_argument("--no-record", action="store_true", help="do not record calls (metrics are still kept)")
    p.add_argument("--header-timeout", type=positive("seconds"), default=HEADER_TIMEOUT,
                   help=f"seconds for a whole request head once it started (default {HEADER_TIMEOUT:g}); 408 after")
    p.add_argument("--idle-timeout", type=positive("seconds"), default=IDLE_TIMEOUT,
                   help=f"close client connections idle this long (default {IDLE_TIMEOUT:g})")
    p.add_argument("--upstream-timeout", type=positive("seconds"), default=None, metavar="SECONDS",
                   help="route timeout: a response not complete this long after the request is answered "
                        "504 (flag UT); off by default, as in Istio")
    p.add_argument("--drain-timeout", type=positive("seconds"), default=DRAIN_TIMEOUT,
                   help=f"seconds in-flight requests get after SIGTERM (default {DRAIN_TIMEOUT:g})")


def _id(text: str) -> int | None:
    """A uid/gid, or 'none' for no exemption by that id."""
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a numeric id: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"ids are >= 0, got {value}")
    return value


def add_iptables_arguments(p: argparse.ArgumentParser) -> None:
    from meshlens.proxy.transparent import DEFAULT_PROXY_GID, DEFAULT_PROXY_UID

    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--print", action="store_true", help="print the iptables commands --apply would run")
    what.add_argument("--apply", action="store_true", help="install the rules (idempotent)")
    what.add_argument("--remove", action="store_true", help="remove our chains and the jumps to them")
    p.add_argument("--outbound-port", type=port(1), default=15001,
                   help="the proxy's outbound listener (default 15001)")
    p.add_argument("--inbound-port", type=port(1), default=15006,
                   help="the proxy's inbound listener (default 15006)")
    p.add_argument("--app-port", type=port(1), action="append", default=[], metavar="PORT",
                   help="incoming TCP to this port goes to the inbound listener (repeatable; none = no inbound)")
    p.add_argument("--proxy-uid", type=_id, default=DEFAULT_PROXY_UID, metavar="UID",
                   help=f"the proxy's uid, whose traffic is not redirected (default {DEFAULT_PROXY_UID}; 'none')")
    p.add_argument("--proxy-gid", type=_id, default=DEFAULT_PROXY_GID, metavar="GID",
                   help=f"the proxy's gid, whose traffic is not redirected (default {DEFAULT_PROXY_GID}; 'none')")
    p.add_argument("--exclude-port", type=port(1), action="append", default=[], metavar="PORT",
                   help="never redirect outgoing TCP to this port (repeatable: ssh, the collector)")
    p.add_argument("--no-outbound", action="store_true", help="redirect inbound traffic only")


def run_iptables(args: argparse.Namespace) -> int:
    from meshlens.proxy.transparent import IptablesError, IptablesPlan, apply, remove, rules

    if args.proxy_uid is None and args.proxy_gid is None and not args.no_outbound:
        raise UserError("--proxy-uid none and --proxy-gid none would redirect the proxy's own connections "
                        "back into it; exempt one of them")
    plan = IptablesPlan(outbound_port=args.outbound_port, inbound_port=args.inbound_port,
                        app_ports=tuple(dict.fromkeys(args.app_port)), proxy_uid=args.proxy_uid,
                        proxy_gid=args.proxy_gid, exclude_ports=tuple(dict.fromkeys(args.exclude_port)),
                        outbound=not args.no_outbound)
    try:
        if args.print:
            ran = rules(plan)
        elif args.apply:
            ran = apply(plan)
        else:
            ran = remove()
    except IptablesError as e:
        raise UserError(str(e)) from None
    for argv in ran:
        print(" ".join(argv))
    return 0


def run(args: argparse.Namespace) -> int:
    from meshlens.cli.listen import check_ports, listen_failure
    from meshlens.collector.client import CallRecorder
    from meshlens.mesh import MeshError, load
    from meshlens.proxy.server import RECORD_BATCH_ROWS, ProxyConfig, observer_id, run as run_proxy

    watch, snap = None, None
    if args.mesh is None and not args.control:
        raise UserError("--mesh FILE or --control URL is required (or MESHLENS_CONTROL in the environment)")
    if args.mesh is None:
        watch, snap, mesh = _from_control(args)
    else:
        try:
            mesh = load(args.mesh)
            mesh.service(args.service)
        except MeshError as e:
            raise UserError(str(e)) from None
    check_ports(ProxyConfig.local_host, {"--outbound-port": args.outbound_port, "--admin-port": args.admin_port,
                                         "--metrics-port": args.metrics_port})
    if args.app_port is not None:
        check_ports(args.inbound_host, {"--inbound-port": args.inbound_port})
    recorder = None
    if not args.no_record:
        try:
            recorder = CallRecorder(args.collector, batch_rows=RECORD_BATCH_ROWS)
        except ValueError as e:
            raise bad_collector_url(args.collector, e) from None
    config = ProxyConfig(service=args.service, mesh=mesh, inbound_port=args.inbound_port,
                         inbound_host=args.inbound_host,
                         outbound_port=args.outbound_port, admin_port=args.admin_port,
                         metrics_port=args.metrics_port, app_port=args.app_port,
                         header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                         drain_timeout=args.drain_timeout, upstream_timeout=args.upstream_timeout,
                         observer_id=watch.instance if watch is not None else observer_id())
    try:
        run_proxy(config, recorder, watch, snap)
    except OSError as e:
        raise UserError(listen_failure(e)) from None
    return 0


def _from_control(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The watch on the control plane, the snapshot to start from, and its mesh (checked)."""
    from pathlib import Path

    from meshlens.config import data_home
    from meshlens.mesh import MeshError, parse
    from meshlens.proxy.control import ControlError, ControlWatch
    from meshlens.proxy.server import observer_id

    cache = Path(args.snapshot_cache) if args.snapshot_cache else data_home() / "proxy" / f"{args.service}.snapshot.json"
    try:
        watch = ControlWatch(args.control, args.service, observer_id(), cache, token=args.control_token,
                             ca=args.control_ca)
        snap = watch.initial()
    except (ValueError, ControlError) as e:
        raise UserError(str(e)) from None
    try:
        mesh = parse(snap.get("mesh"), f"the control plane's snapshot {snap.get('version')}")
        mesh.service(args.service)
    except MeshError as e:
        raise UserError(f"{e} (apply a mesh that names it: meshlens apply -f mesh.yaml)") from None
    return watch, snap, mesh

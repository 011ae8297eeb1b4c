"""`meshlens control` (the control plane) and the commands that talk to it, in kubectl/istioctl habits:
`apply`, `get`, `delete`, `mode set|get`, `history`."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from meshlens.cli.argtypes import port
from meshlens.cli.errors import UserError

CONTROL_EPILOG = """examples:
  meshlens control
      the control plane on 127.0.0.1:15010, its store under ~/.local/share/meshlens/control
  meshlens control --store sqlite:/var/lib/meshlens/control.db --port 0
  meshlens control --store etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379
      replicas over one etcd cluster serve the same mesh and see each other's changes

  meshlens control --host 0.0.0.0 --tokens tokens.yaml --tls-cert api.pem --tls-key api.key
      beyond loopback: every request needs a token (read, write, or a sidecar's), over HTTPS
  meshlens control --ca-cert intermediate-chain.pem --ca-key intermediate-key.pem
      workload certificates signed by your own CA (else a root made at first start;
      `meshlens ca rotate` rotates that one)
  meshlens control --calls-store http://127.0.0.1:8123/
      reads the collector's calls: STRICT mTLS checked against who still calls in plaintext,
      and guarded switches to enforce judged (meshlens mode set S enforce --guard)
  meshlens control --collector http://127.0.0.1:4318
      every change also becomes a row of the collector's mesh_changes, for dashboards to mark;
      what changed while the collector was away is shipped once it is back

Open http://127.0.0.1:15010/console/ for the service map, each service's mode and the live tail
(with --calls-store). Without --tokens it listens on loopback only. Every change is validated before it is
stored, gets a revision, and is audited (with tokens, under the token's name)."""

CLIENT_EPILOG = """examples:
  meshlens apply -f mesh.yaml -f payment-service.yaml --reason "canary for v2"
  meshlens diff -f payment-service.yaml
  meshlens get virtualservice
  meshlens get vs production/payment-service -o yaml
  meshlens mode set payment-service dry-run --reason "try the retry policy"
  meshlens mode set payment-service enforce --guard --reason "back to dry-run by itself if it hurts"
  meshlens mode get
  meshlens history payment-service
  meshlens status
  meshlens delete destinationrule default/payment-service --reason "rolled back"

All take --control URL (or MESHLENS_CONTROL; default http://127.0.0.1:15010)."""

MODE_SET_EPILOG = """examples:
  meshlens mode set payment-service dry-run --reason "try the retry policy"
  meshlens mode set payment-service enforce --guard --reason "retries, judged"
      enforce, watched by the control plane for 5m against the last 5m of dry-run's calls,
      and switched back to dry-run by itself if the error rate rose by more than 1 percentage
      point (with its 95% interval above dry-run's) or p99 by more than 1.5x (and 5 ms)
  meshlens mode set cart enforce --guard --window 15m --max-error-increase 0.5 \\
      --max-p99-ratio 1.2 --min-calls 500 --wait --reason "the new timeout"
      follow it to its end: exit 0 passed, 1 rolled back, 3 unjudged (too few calls) or cancelled
  meshlens mode guard cart
      where a guard stands: its baseline, the figures so far, the time left, its outcome

A guard needs the service in dry-run, `meshlens control --calls-store URL`, and at least
--min-calls calls in dry-run over the window; else it is refused and nothing changes.
All take --control URL (or MESHLENS_CONTROL; default http://127.0.0.1:15010)."""

# kubectl's habit: kinds by name, lowercase, plural or short.
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_KIND_ALIASES = {
    "mesh": "Mesh", "meshes": "Mesh",
    "virtualservice": "VirtualService", "virtualservices": "VirtualService", "vs": "VirtualService",
    "destinationrule": "DestinationRule", "destinationrules": "DestinationRule", "dr": "DestinationRule",
    "peerauthentication": "PeerAuthentication", "peerauthentications": "PeerAuthentication", "pa": "PeerAuthentication",
    "authorizationpolicy": "AuthorizationPolicy", "authorizationpolicies": "AuthorizationPolicy", "ap": "AuthorizationPolicy",
    "localratelimit": "LocalRateLimit", "localratelimits": "LocalRateLimit",
    "mode": "Mode", "modes": "Mode",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("control", help="the control plane: policies, the mesh and each service's mode",
                       description="Serve the mesh model, the policies and each service's mode, with every change "
                                   "validated, versioned and audited.", epilog=CONTROL_EPILOG, formatter_class=fmt)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback only with --tokens)")
    p.add_argument("--port", type=port(0), default=15010, help="port (default 15010, Istio's; 0 = any free port)")
    p.add_argument("--store", help="sqlite:PATH (default: ~/.local/share/meshlens/control/control.db), or "
                                   "etcd://HOST:PORT[,HOST:PORT...] for several control planes over one etcd cluster")
    p.add_argument("--tokens", metavar="FILE", help="who may read, write, or poll as a sidecar: a YAML list of "
                                                    "name, token (or token_sha256) and role (see control/auth.py)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="… and this private key")
    p.add_argument("--collector", metavar="URL", default=os.environ.get("MESHLENS_COLLECTOR"),
                   help="ship every change to this collector's mesh_changes: http://HOST:4318 (default: "
                        "MESHLENS_COLLECTOR, else none)")
    p.add_argument("--ca-dir", metavar="DIR", help="where the mesh's root CA is kept (made at first start; default: "
                                                   "~/.local/share/meshlens/control/ca)")
    p.add_argument("--ca-cert", metavar="PEM", help="sign workload certificates with your own root or intermediate "
                                                   "(followed by its chain up to the root) ...")
    p.add_argument("--ca-key", metavar="PEM", help="... and its ECDSA P-256 key")
    p.add_argument("--ca-trust", metavar="PEM", help="with --ca-cert: more roots to trust (a rotation of your root: "
                                                     "the new one before it signs, the old one after)")
    p.add_argument("--calls-store", metavar="URL", default=os.environ.get("MESHLENS_STORE"),
                   help="where the readiness gate reads recorded calls before STRICT mTLS is enforced, and guards "
                        "judge a switch to enforce: a collector's query endpoint (http://HOST:8123/) or ClickHouse "
                        "(default: MESHLENS_STORE, else none: such a change needs --force, and guards are refused)")
    p.add_argument("--cert-lifetime", default="24h", metavar="DURATION",
                   help="of workload certificates (default 24h, Istio's; sidecars renew at half of it; at least 10s)")
    p.add_argument("--trust-domain", default="cluster.local",
                   help="the SPIFFE trust domain of workload identities (default cluster.local, Istio's)")
    p.set_defaults(run=run_control)

    def client(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=description, epilog=CLIENT_EPILOG, formatter_class=fmt)
        c.add_argument("--control", metavar="URL", help="the control plane (default: MESHLENS_CONTROL, "
                                                       "else http://127.0.0.1:15010)")
        c.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: MESHLENS_TOKEN)")
        c.add_argument("--ca", default=argparse.SUPPRESS, metavar="PEM",
                       help="CA an https control plane's certificate is checked against (default: MESHLENS_CONTROL_CA)")
        return c

    c = client("apply", "store policies and mesh definitions from YAML (all documents, or none)",
               "Validate and store every document of the files given (multi-document YAML; '-' reads stdin): "
               "all of them, or none if one is wrong.")
    c.add_argument("-f", "--filename", action="append", required=True, metavar="FILE", help="YAML file, or - for stdin")
    c.add_argument("--reason", default="", help="why, for the history")
    c.add_argument("--force", action="store_true", help="past the readiness gate: enforce STRICT mTLS even on a service whose callers still send plaintext")
    c.set_defaults(run=run_apply)

    c = client("diff", "what an apply of these files would change, as a diff (nothing stored)",
               "Validate the files as apply does and show, for each document, whether it would be created, "
               "configured or unchanged, with a unified diff of what changes. Exit code 1 when something would.")
    c.add_argument("-f", "--filename", action="append", required=True, metavar="FILE", help="YAML file, or - for stdin")
    c.set_defaults(run=run_diff)

    c = client("get", "show stored resources", "Show the stored resources of a kind, or one of them.")
    c.add_argument("kind", help="VirtualService (vs), DestinationRule (dr), PeerAuthentication, AuthorizationPolicy, "
                                "LocalRateLimit, Mesh, Mode")
    c.add_argument("name", nargs="?", help="namespace/name for Istio's kinds (default namespace: default)")
    c.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    c.set_defaults(run=run_get)

    c = client("delete", "delete a stored resource", "Delete one stored resource (audited).")
    c.add_argument("kind")
    c.add_argument("name")
    c.add_argument("--reason", default="", help="why, for the history")
    c.set_defaults(run=run_delete)

    c = client("mode", "set or show each service's mode: observe, dry-run, enforce",
               "observe: traffic untouched, every call recorded; dry-run: every policy evaluated and what it would "
               "have done recorded; enforce: policies applied. A service's mode governs the policies for calls to it.")
    msub = c.add_subparsers(dest="mode_command", metavar="set|get|guard", required=True)
    s = msub.add_parser("set", help="switch a service's mode (audited)", epilog=MODE_SET_EPILOG, formatter_class=fmt,
                        description="Switch the mode of calls to a service; the change is stored and audited. With "
                                    "--guard, a switch to enforce is watched by the control plane and switched back "
                                    "to dry-run by itself if it made the service's calls worse.")
    s.add_argument("service")
    s.add_argument("mode", choices=["observe", "dry-run", "enforce"])
    s.add_argument("--reason", required=True, help="why, for the history (required: a mode switch is a decision)")
    s.add_argument("--force", action="store_true", help="past the readiness gate: enforce STRICT mTLS even on a service whose callers still send plaintext")
    s.add_argument("--guard", action="store_true",
                   help="enforce watched against dry-run's calls, and switched back to dry-run if it made them worse")
    s.add_argument("--window", metavar="DURATION",
                   help="with --guard: how long enforce is watched, and how far back dry-run's calls are its "
                        "baseline (default 5m)")
    s.add_argument("--interval", metavar="DURATION", help="with --guard: how often the figures are read (default 5s)")
    s.add_argument("--min-calls", type=int, metavar="N",
                   help="with --guard: calls needed in each mode to judge (default 100)")
    s.add_argument("--max-error-increase", type=float, metavar="PP",
                   help="with --guard: percentage points of error rate enforce may add (default 1)")
    s.add_argument("--max-p99-ratio", type=float, metavar="R",
                   help="with --guard: how many times dry-run's p99 enforce's may be (default 1.5) ...")
    s.add_argument("--min-p99-increase", metavar="DURATION",
                   help="with --guard: ... and by how much at least before it counts (default 5ms)")
    s.add_argument("--wait", action="store_true",
                   help="with --guard: follow it to its end; exit 0 passed, 1 rolled back, 3 unjudged or cancelled")
    s.set_defaults(run=run_mode_set)
    g = msub.add_parser("get", help="show the mode of every service, or of one", epilog=CLIENT_EPILOG,
                        formatter_class=fmt, description="Show the mode of every service in the mesh, or of one.")
    g.add_argument("service", nargs="?")
    g.set_defaults(run=run_mode_get)
    w = msub.add_parser("guard", help="where each guarded switch to enforce stands", epilog=MODE_SET_EPILOG,
                        formatter_class=fmt, description="Every guard (or one service's): its baseline in dry-run, "
                                                         "the figures in enforce so far, the time left, what rolls "
                                                         "it back, and its outcome with why.")
    w.add_argument("service", nargs="?")
    w.add_argument("-o", "--output", choices=["table", "json"], default="table")
    w.set_defaults(run=run_mode_guard)
    for m in (s, g, w):
        m.add_argument("--control", metavar="URL", default=argparse.SUPPRESS,
                       help="the control plane (default: MESHLENS_CONTROL, else http://127.0.0.1:15010)")
        m.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: MESHLENS_TOKEN)")
        m.add_argument("--ca", default=argparse.SUPPRESS, metavar="PEM", help="CA for an https control plane")

    c = client("status", "every sidecar following the control plane: what it applied, ACK or NACK",
               "Every sidecar that polled the control plane: the snapshot version it applied, its last ACK or NACK "
               "and the error, the mode asked of it and the one it applies, when it was last heard from.")
    c.add_argument("-o", "--output", choices=["table", "json"], default="table")
    c.set_defaults(run=run_status)

    c = client("history", "what changed, who changed it, and why",
               "The audit log: every change with its revision, time, author, action and reason, oldest first.")
    c.add_argument("service", nargs="?", help="only changes to resources named for this service")
    c.add_argument("--kind")
    c.add_argument("--limit", type=int, default=50)
    c.add_argument("-o", "--output", choices=["table", "json"], default="table")
    c.set_defaults(run=run_history)


# -- the control plane ------------------------------------------------------------------------------

def run_control(args: argparse.Namespace) -> int:
    from meshlens.cli.listen import check_ports
    from meshlens.collector.client import is_loopback
    from meshlens.control.auth import TokenError, load_tokens
    from meshlens.control.changes import changes_url
    from meshlens.control.service import run, server_tls
    from meshlens.control.store import StoreUnavailable, StoreURLError, default_store_url, open_store

    tokens = None
    if args.tokens:
        try:
            tokens = load_tokens(args.tokens)
        except TokenError as e:
            raise UserError(str(e)) from None
    elif not is_loopback(args.host):
        raise UserError(f"--host {args.host}: without --tokens the control plane listens on loopback only "
                        f"(127.0.0.1 or ::1): anyone who reaches it could change the mesh")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        try:
            tls = server_tls(args.tls_cert, args.tls_key)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.collector:
        try:
            changes_url(args.collector)
        except ValueError as e:
            raise UserError(f"--collector: {e}") from None
    from meshlens.config import data_home
    from meshlens.control.ca import CA, CAError

    if not _TRUST_DOMAIN.fullmatch(args.trust_domain):
        raise UserError(f"--trust-domain {args.trust_domain!r}: lowercase letters, digits, '-' and '.' (a DNS name)")
    from meshlens.policy.spec import duration_s

    try:
        lifetime = duration_s(args.cert_lifetime)
    except ValueError as e:
        raise UserError(f"--cert-lifetime: {e}") from None
    if not 10 <= lifetime <= 90 * 86400:
        raise UserError(f"--cert-lifetime {args.cert_lifetime}: from 10s to 90 days")
    try:
        ca = CA.open(Path(args.ca_dir) if args.ca_dir else data_home() / "control" / "ca", args.trust_domain,
                     args.ca_cert, args.ca_key, dt.timedelta(seconds=lifetime), args.ca_trust)
    except (CAError, OSError) as e:
        raise UserError(f"CA: {getattr(e, 'strerror', None) or e}") from None
    check_ports(args.host, {"--port": args.port})
    try:
        store = open_store(args.store or default_store_url())
    except StoreURLError as e:
        raise UserError(str(e)) from None
    try:
        run(store, args.host, args.port, tokens, tls, args.collector, ca, args.calls_store)
    except (StoreUnavailable, StoreURLError) as e:
        raise UserError(str(e)) from None
    return 0


# -- its clients ------------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Any:
    from meshlens.control.client import ControlClient, ControlError, control_url

    try:
        return ControlClient(control_url(getattr(args, "control", None)), token=getattr(args, "token", None),
                             ca=getattr(args, "ca", None))
    except ControlError as e:
        raise UserError(str(e)) from None


def _call(fn: Any, *a: Any, **kw: Any) -> dict[str, Any]:
    from meshlens.control.client import ControlError

    try:
        return fn(*a, **kw)
    except ControlError as e:
        raise UserError(str(e)) from None


def _kind(text: str) -> str:
    from meshlens.policy.resources import KINDS

    kind = _KIND_ALIASES.get(text.lower(), text)
    if kind not in KINDS:
        raise UserError(f"unknown kind {text!r} (known: {', '.join(KINDS)})")
    return kind


def _name(kind: str, name: str) -> str:
    """Istio's kinds are stored as namespace/name; a bare name is in `default`, as kubectl has it."""
    from meshlens.policy.resources import API_VERSIONS

    if "/" not in name and not API_VERSIONS[kind][0].startswith("meshlens.io/"):
        return f"default/{name}"
    return name


def _read_files(paths: list[str]) -> list[tuple[str, str]]:
    docs = []
    for path in paths:
        if path == "-":
            docs.append(("stdin", sys.stdin.read()))
            continue
        try:
            with open(path, encoding="utf-8") as f:
                docs.append((path, f.read()))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"cannot read {path}: not UTF-8 text (byte {e.start})") from None
    return docs


def run_apply(args: argparse.Namespace) -> int:
    client = _client(args)
    docs = _read_files(args.filename)
    out = _call(client.apply, docs, args.reason, force=args.force)  # one change: all the files, or none of them
    for r in out["results"]:
        print(f"{r['kind'].lower()}/{r['name']} {r['action']}")
        for w in r["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """kubectl diff's habit: exit 0 when nothing would change, 1 when something would."""
    out = _call(_client(args).apply, _read_files(args.filename), "", True)
    changed = False
    for r in out["results"]:
        label = f"{r['kind'].lower()}/{r['name']}"
        print(f"{label} {'would be ' + r['action'] if r['action'] != 'unchanged' else 'unchanged'}")
        for w in r["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        if r["action"] != "unchanged":
            changed = True
            write_diff(r)
    return 1 if changed else 0


def write_diff(result: dict[str, Any]) -> None:
    """One result of a dry-run apply (its document before and after) as a unified diff on stdout."""
    import difflib

    import yaml

    label = f"{result['kind'].lower()}/{result['name']}"
    before = yaml.safe_dump(result["before"], sort_keys=False).splitlines(keepends=True) if result["before"] else []
    after = yaml.safe_dump(result["after"], sort_keys=False).splitlines(keepends=True)
    sys.stdout.writelines(difflib.unified_diff(before, after, f"stored/{label}", f"applied/{label}"))


def run_get(args: argparse.Namespace) -> int:
    client = _client(args)
    kind = _kind(args.kind)
    if args.name is not None:
        items = [_call(client.get, kind, _name(kind, args.name))]
    else:
        items = _call(client.get, kind)["items"]
    if args.output == "json":
        print(json.dumps([i["doc"] for i in items] if args.name is None else items[0]["doc"], indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump_all([i["doc"] for i in items], sort_keys=False).rstrip())
    elif not items:
        print(f"no {kind} stored", file=sys.stderr)
    else:
        width = max(len(i["name"]) for i in items)
        print(f"{'NAME':{width}}  REVISION")
        for i in items:
            print(f"{i['name']:{width}}  {i['revision']}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    name = _name(kind, args.name)
    out = _call(_client(args).delete, kind, name, args.reason)
    print(f"{kind.lower()}/{name} deleted (revision {out['revision']})")
    return 0


_GUARD_FLAGS = {"window": "--window", "interval": "--interval", "min_calls": "--min-calls",
                "max_error_increase": "--max-error-increase", "max_p99_ratio": "--max-p99-ratio",
                "min_p99_increase": "--min-p99-increase"}
# --wait's exit codes: passed, rolled back, anything else (unjudged, cancelled).
_GUARD_EXIT = {"passed": 0, "rolled-back": 1}
_GUARD_EXIT_OTHER = 3


def run_mode_set(args: argparse.Namespace) -> int:
    settings = {k: getattr(args, k) for k in _GUARD_FLAGS if getattr(args, k) is not None}
    if not args.guard:
        given = [_GUARD_FLAGS[k] for k in settings] + (["--wait"] if args.wait else [])
        if given:
            raise UserError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --guard")
    elif args.mode != "enforce":
        raise UserError(f"--guard watches a switch to enforce, not to {args.mode}")
    client = _client(args)
    out = _call(client.set_mode, args.service, args.mode, args.reason, force=args.force,
                guard=settings if args.guard else None)
    state = "unchanged" if out["action"] == "unchanged" else f"set (revision {out['revision']})"
    if "guard" not in out:
        print(f"{out['service']}: {out['mode']} {state}")
        return 0
    g = out["guard"]
    print(f"{out['service']}: {out['mode']} {state}, guarded for {g['window']}")
    print(f"baseline (dry-run, the last {g['window']}): {g['baseline_text']}")
    print(f"back to dry-run by itself {g['rolls_back_if']}")
    if not args.wait:
        print(f"follow it: meshlens mode guard {out['service']}")
        return 0
    return _follow(client, out["service"], g["started"], g["settings"]["interval_s"])


def _follow(client: Any, service: str, started: float, interval: float) -> int:
    """Print each new reading of the guard until it ends; its outcome's exit code."""
    from meshlens.control.client import ControlError

    checked, away = None, False
    while True:
        try:
            [g] = client.guards(service)["guards"]
        except ControlError as e:
            if e.status:
                raise UserError(str(e)) from None
            if not away:  # a control plane restarted mid-guard resumes it: wait for it
                print(f"  {e}; still waiting", file=sys.stderr, flush=True)
            away = True
            time.sleep(1.0)
            continue
        away = False
        if g["started"] != started:
            raise UserError(f"{service}'s guard was replaced by another (meshlens mode guard {service})")
        if g["outcome"] != "running":
            print(g["why"], flush=True)
            return _GUARD_EXIT.get(g["outcome"], _GUARD_EXIT_OTHER)
        if g["checked_at"] != checked:
            checked = g["checked_at"]
            elapsed = g["settings"]["window_s"] - g["time_left_s"]
            said = (f"enforce {g['enforce_text']}" if g["enforce_text"] else "no calls in enforce yet") + \
                (f"; {g['needs_calls']:,} more to judge" if g["needs_calls"] else "")
            print(f"  {elapsed:.0f}s of {g['window']}: {said}" + (f" ({g['error']})" if g["error"] else ""),
                  flush=True)
        time.sleep(min(max(interval, 0.2), 5.0))


def run_mode_guard(args: argparse.Namespace) -> int:
    out = _call(_client(args).guards, args.service)
    if args.output == "json":
        print(json.dumps(out["guards"] if args.service is None else out["guards"][0], indent=2))
        return 0
    if not out["guards"]:
        print("no guard was ever started (meshlens mode set SERVICE enforce --guard)", file=sys.stderr)
    for g in out["guards"]:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(g["started"]))
        left = f", {g['time_left_s']:.0f}s left of {g['window']}" if g["outcome"] == "running" else ""
        print(f"{g['service']}: {g['outcome']}{left} (started {when} by {g['who']}"
              + (f": {g['reason']})" if g["reason"] else ")"))
        print(f"  baseline  dry-run, the {g['window']} before: {g['baseline_text']}")
        print(f"  enforce   since the switch: {g['enforce_text'] or 'no calls yet'}"
              + (f"; {g['needs_calls']:,} more to judge" if g["needs_calls"] else ""))
        if g["outcome"] == "running":
            print(f"  rolls back {g['rolls_back_if']}")
        if g["error"]:
            print(f"  calls store: {g['error']}")
        if g["why"]:
            print(f"  {g['why']}")
    return 0


def run_mode_get(args: argparse.Namespace) -> int:
    modes = _call(_client(args).modes, args.service)["modes"]
    if not modes:
        print("no services: apply a Mesh first", file=sys.stderr)
        return 0
    width = max(map(len, modes))
    print(f"{'SERVICE':{width}}  MODE")
    for service, mode in modes.items():
        print(f"{service:{width}}  {mode}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    out = _call(_client(args).status)
    sidecars = out["sidecars"]
    if args.output == "json":
        print(json.dumps(out, indent=2))
        return 0
    if not sidecars:
        print(f"no sidecar has polled this control plane (revision {out['revision']})", file=sys.stderr)
        return 0
    now = time.time()
    rows = [("SERVICE", "INSTANCE", "APPLIED", "STATE", "MODE (ASKED)", "SEEN", "ERROR")]
    for s in sidecars:
        rows.append((s["service"], s["instance"], s["applied_version"] or "-", s["state"],
                     f"{s['mode'] or '-'} ({s['desired_mode']})", f"{now - s['last_seen']:.0f}s ago", s["error"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{v:{w}}" for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def run_history(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise UserError(f"--limit must be 1 to 1000, got {args.limit}")
    from meshlens.policy.resources import CONTROL_PLANE_KINDS

    ours = {k.lower(): k for k in CONTROL_PLANE_KINDS}
    kind = None if not args.kind else ours.get(args.kind.lower()) or _kind(args.kind)
    entries = _call(_client(args).history, kind, None, args.limit, args.service)["entries"]
    if args.output == "json":
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["time"]))
        what = f"{e['kind']} {e['name']} {e['action']}"
        if e["kind"] == "TrustBundle":
            spec = (e["after"] or {}).get("spec", {})
            what = f"trust: {len(spec.get('roots', []))} root(s), rotation {spec.get('rotation', 'none')}"
        if e["kind"] == "Guard":
            what = f"guard of {e['name']}: {((e['after'] or {}).get('spec') or {}).get('outcome', 'deleted')}"
        if e["kind"] == "Mode":
            before = (e["before"] or {}).get("spec", {}).get("mode", "observe")
            after = (e["after"] or {}).get("spec", {}).get("mode", "observe")
            what = f"mode of {e['name']}: {before} -> {after}"
        reason = f"  ({e['reason']})" if e["reason"] else ""
        print(f"{e['revision']:>6}  {when}  {e['who']}  {what}{reason}")
    return 0

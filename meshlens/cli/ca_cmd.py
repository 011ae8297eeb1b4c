"""`meshlens ca status` and `meshlens ca rotate begin|switch|finish`: the mesh's CA, and its root rotated with no
failed request (control/ca.py, control/rotation.py)."""
from __future__ import annotations

import argparse
import json
import sys

from meshlens.cli.errors import UserError

CA_EPILOG = """examples:
  meshlens ca status
      the roots (which one signs), where a rotation stands, what each sidecar holds, the next step
  meshlens ca rotate begin --reason "yearly root rotation"
      a new root, trusted beside the old one by every sidecar with its next snapshot
  meshlens ca rotate switch
      the new root signs; every sidecar renews within seconds (refused while one does not trust it yet)
  meshlens ca rotate finish
      the old root dropped (refused while a sidecar still holds a certificate from it)

Each step is audited (`meshlens history --kind TrustBundle`). --force goes past the check
that no sidecar would break. With your own CA files (meshlens control --ca-cert) the same
steps are restarts of the control plane with --ca-trust.
All take --control URL (or MESHLENS_CONTROL; default http://127.0.0.1:15010)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    c = sub.add_parser("ca", help="the mesh's CA: its roots, and their rotation with no failed request",
                       description="The control plane's certificate authority: the roots workload certificates "
                                   "chain to, and the rotation of the root in three steps.",
                       epilog=CA_EPILOG, formatter_class=fmt)
    csub = c.add_subparsers(dest="ca_command", metavar="status|rotate", required=True)
    s = csub.add_parser("status", help="the roots, the rotation, what each sidecar holds", epilog=CA_EPILOG,
                        formatter_class=fmt, description="The roots (which signs, which is next or previous), "
                        "where a rotation stands, what each live sidecar's certificate chains to and trusts, and "
                        "whether the next step would break anyone.")
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(run=run_status)
    r = csub.add_parser("rotate", help="one step of a root rotation: begin, switch, finish", epilog=CA_EPILOG,
                        formatter_class=fmt, description="begin: a new root, trusted beside the old; switch: the "
                        "new root signs and sidecars renew; finish: the old root dropped.")
    r.add_argument("step", choices=["begin", "switch", "finish"])
    r.add_argument("--reason", default="", help="why, for the history")
    r.add_argument("--force", action="store_true", help="even if a sidecar would break (it is named otherwise)")
    r.set_defaults(run=run_rotate)
    for p in (s, r):
        p.add_argument("--control", metavar="URL", help="the control plane (default: MESHLENS_CONTROL, "
                                                       "else http://127.0.0.1:15010)")
        p.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (default: MESHLENS_TOKEN)")
        p.add_argument("--ca", default=argparse.SUPPRESS, metavar="PEM",
                       help="CA an https control plane's certificate is checked against (default: MESHLENS_CONTROL_CA)")


def _client(args: argparse.Namespace):  # noqa: ANN202
    from meshlens.control.client import ControlClient, ControlError, control_url

    try:
        return ControlClient(control_url(args.control), token=getattr(args, "token", None),
                             ca=getattr(args, "ca", None))
    except ControlError as e:
        raise UserError(str(e)) from None


def _request(args: argparse.Namespace, method: str, path: str, body: bytes | None = None, **kw: object) -> dict:
    from meshlens.control.client import ControlError

    try:
        return _client(args).request(method, path, body, **kw)  # type: ignore[arg-type]
    except ControlError as e:
        raise UserError(str(e)) from None


def run_status(args: argparse.Namespace) -> int:
    out = _request(args, "GET", "/v1/ca")
    if args.output == "json":
        print(json.dumps(out, indent=2))
        return 0
    print(f"trust domain {out['trust_domain']}; rotation: {out['rotation']}"
          + ("; your own CA files (rotated by restarts with --ca-trust)" if out["own_files"] else ""))
    print(f"certificates issued {out['issued']}, refused {out['refused']} (since this control plane started)")
    for root in out["roots"]:
        print(f"  {root['role']:<9} {root['fingerprint'][:16]}  {root['subject']}  until {root['not_after'][:10]}")
    sidecars = out["sidecars"]
    if sidecars:
        rows = [("SERVICE", "INSTANCE", "CERTIFICATE FROM", "TRUSTS")]
        rows += [(s["service"], s["instance"], s["certificate_root_role"], ", ".join(s["trusts"])) for s in sidecars]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(f"{v:{w}}" for v, w in zip(r, widths)) + "  " + r[3])
    else:
        print("no live sidecar holds a certificate")
    if out["next_step"]:
        print(f"next step: meshlens ca rotate {out['next_step']}"
              + ("" if out["ready"] else f" - not yet: {out['not_ready']}"), file=sys.stderr)
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    body = json.dumps({"step": args.step, "reason": args.reason}).encode()
    out = _request(args, "POST", "/v1/ca/rotate", body, headers={"Content-Type": "application/json"},
                   query={"force": "true"} if args.force else None)
    after = {"begun": "every sidecar trusts the new root with its next snapshot; then: meshlens ca rotate switch",
             "switched": "sidecars renew from the new root within seconds; then: meshlens ca rotate finish",
             "none": "the old root is no longer trusted: the rotation is done"}[out["rotation"]]
    print(f"root rotation: {args.step} stored at revision {out['revision']}; {after}")
    return 0

"""`meshlens mtls readiness`: who would break if a service went STRICT, and the order that breaks no one."""
from __future__ import annotations

import argparse
import json
import sys

from meshlens.cli.analysis_cmd import _common, _scoped

READINESS_EPILOG = """examples:
  meshlens mtls readiness                      # every service that has callers in the record
  meshlens mtls readiness payments --window 7d # one service, the last week's calls
  meshlens mtls readiness --format json

a caller is listed with its calls, how many were mTLS and plaintext, whether it has a sidecar,
and when it last sent plaintext; callers without a sidecar are named by their address. The
steps are the safe order: every client on mTLS first, then STRICT in dry-run (each plaintext
call recorded would_refuse_plaintext), and the server enforced STRICT last."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mtls", help="mTLS: readiness for STRICT, from the recorded calls",
                       description="Mutual TLS, from the recorded calls.")
    msub = m.add_subparsers(dest="mtls_command", required=True, metavar="COMMAND")
    r = msub.add_parser("readiness", help="who would break under STRICT, and the rollout that breaks no one",
                        description="For each service (or SERVICE): the callers that would break if it went STRICT "
                                    "now, and the order of a rollout that breaks no one.", epilog=READINESS_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("service_name", nargs="?", metavar="SERVICE", help="only this destination service")
    _common(r)
    r.add_argument("--format", choices=["table", "json"], default="table")
    r.set_defaults(run=run_readiness)


def run_readiness(args: argparse.Namespace) -> int:
    from meshlens.analysis.mtls import readiness
    from meshlens.analysis.scope import open_scope
    from meshlens.cli.query_cmd import format_table

    if args.service_name and args.service and args.service_name != args.service:
        from meshlens.cli.errors import UserError

        raise UserError(f"SERVICE {args.service_name!r} and --service {args.service!r} name two services")
    args.service = args.service_name or args.service
    found = _scoped(args, lambda store, window, service: readiness(open_scope(store, window, service)))
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in found], indent=1))
        return 0
    out = sys.stdout
    for r in found:
        out.write(f"{r.service}: {r.verdict}; would break under STRICT now: "
                  f"{', '.join(r.would_break) if r.would_break else 'no one'}\n")
        header = ["caller", "calls", "mtls", "plaintext", "sidecar", "last plaintext", "seen by"]
        rows = [(c["caller"], c["calls"], c["mtls"], c["plaintext"], "yes" if c["sidecar"] else "no",
                 c["last_plaintext"] or "-", c["seen_by"]) for c in r.callers]
        out.write(format_table(header, rows))
        for i, step in enumerate(r.steps, 1):
            out.write(f"  {i}. {step}\n")
        out.write("\n")
    return 0

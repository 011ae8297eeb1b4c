"""`meshlens dryrun report SERVICE`: what dry-run recorded each policy would have done, and what that would
change for the service's callers, next to what was expected (analysis/dryrun.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshlens.cli.errors import UserError

EPILOG = """examples:
  meshlens dryrun report cart                    # every recorded call, the policies from the control plane
  meshlens dryrun report payment --window 30m
  meshlens dryrun report payment --format json --store http://collector:8123/ --control http://cp:15010

Per policy: the calls it would have acted on (would_timeout, would_retry, would_eject, ...) with a few
examples; the calls as callers would have had them enforced (error rate, p99), next to the what-if
stored with the recommended policy (meshlens recommend --apply) and what observe measured before;
where dry-run and the expectation disagree, it says so. Then: meshlens mode set SERVICE enforce --guard."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from meshlens.cli.analysis_cmd import _common

    fmt = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser("dryrun", help="what dry-run says enforcing a service's policies would do",
                       description="Reports on services in dry-run.", epilog=EPILOG, formatter_class=fmt)
    dsub = d.add_subparsers(dest="dryrun_command", metavar="report", required=True)
    r = dsub.add_parser("report", help="a service's dry-run: per policy, what it would have done and changed",
                        description="What dry-run recorded each policy of SERVICE would have done, what enforcing "
                                    "would change for its callers, and where that disagrees with the "
                                    "recommendation's what-if.", epilog=EPILOG, formatter_class=fmt)
    r.add_argument("service")
    _common(r, service=False)
    r.add_argument("--format", choices=["text", "json"], default="text")
    r.add_argument("--control", metavar="URL", help="where the policies and their what-ifs are stored (default: "
                                                   "MESHLENS_CONTROL, else http://127.0.0.1:15010)")
    r.add_argument("--token", help="bearer token (default: MESHLENS_TOKEN)")
    r.add_argument("--ca", metavar="PEM", help="CA an https control plane's certificate is checked against")
    r.set_defaults(run=run_report)


def stored_policies(args: argparse.Namespace, service: str) -> tuple[list[dict[str, Any]], str]:
    """The service's policy documents in the control plane, and a note when they could not be read."""
    from meshlens.analysis.proposal import stored_for
    from meshlens.control.client import ControlClient, ControlError, control_url

    try:
        return stored_for(ControlClient(control_url(args.control), token=args.token, ca=args.ca), service), ""
    except ControlError as e:
        return [], f"no what-if to compare with: {e}"


def run_report(args: argparse.Namespace) -> int:
    from meshlens.analysis.dryrun import dryrun_report
    from meshlens.cli.analysis_cmd import _scoped

    stored, note = stored_policies(args, args.service)
    report = _scoped(args, lambda store, window, _: dryrun_report(store, window, args.service, stored),
                     service=args.service)
    if note:
        print(note, file=sys.stderr)
    if args.format == "json":
        print(json.dumps(report.as_dict(), indent=1, default=str))
    else:
        sys.stdout.write(report.text())
    return 0

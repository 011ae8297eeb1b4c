"""`meshlens SUBCOMMAND …`: parse, dispatch, and turn user errors into one line and exit 2."""
from __future__ import annotations

import argparse
import logging
import sys

from meshlens import __version__
from meshlens.cli import (analysis_cmd, ca_cmd, collector_cmd, control_cmd, dashboards_cmd, demo_cmd, dryrun_cmd,
                          mtls_cmd, proxy_cmd, query_cmd, schema_cmd, tap_cmd)
from meshlens.cli.errors import UserError
from meshlens.config import ConfigError

EXIT_USAGE = 2

DESCRIPTION = """meshlens — an observability-first service mesh.

Record every inter-service call into ClickHouse (sidecar proxies, a passive tap,
OpenTelemetry spans), then let analysis recommend timeouts, retries, circuit
breakers and mTLS before anything is enforced."""

EPILOG = """examples:
  meshlens demo                           # the whole story on one machine: shop, sidecars, tap, faults, recommendations
  meshlens collector                      # OTLP on 4317/4318, queries on 8123, embedded store
  meshlens query "SELECT count() FROM calls"
  meshlens schema --store clickhouse://ch1:9000/meshlens --cluster prod
  meshlens proxy --service web --mesh mesh.yaml --app-port 8080   # sidecar: inbound 15006, outbound 15001
  meshlens proxy-iptables --apply --app-port 8080   # transparent mode: redirect this namespace's TCP
  meshlens tap --iface eth0 --filter "tcp port 80" --mesh mesh.yaml   # passive: calls off the wire
  meshlens analyze --window 1h            # service graph: rate, errors, latency quantiles
  meshlens recommend --format yaml        # timeouts, retries, outlier detection, mTLS, with evidence
  meshlens recommend --apply --service cart   # stored in the control plane, cart put in dry-run
  meshlens dryrun report cart             # what the policies would have done, against what was expected
  meshlens dashboards provision --grafana-url http://127.0.0.1:3000 --token "$TOKEN"
  meshlens control                        # the control plane on 127.0.0.1:15010: policies, the mesh, modes
  meshlens apply -f payment-service.yaml  # Istio VirtualService / DestinationRule YAML, validated, audited
  meshlens mode set payment-service dry-run --reason "try the retry policy"

Run `meshlens SUBCOMMAND --help` for each subcommand's options and examples."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meshlens", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"meshlens {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (logs go to stderr as key=value)")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for mod in (collector_cmd, query_cmd, schema_cmd, analysis_cmd, proxy_cmd, tap_cmd, demo_cmd, dashboards_cmd,
                control_cmd, ca_cmd, mtls_cmd, dryrun_cmd):
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except (UserError, ConfigError) as e:
        print(f"meshlens {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""`meshlens dashboards provision|write-files|list`: install the Grafana dashboards and their datasources."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meshlens.cli.argtypes import positive
from meshlens.cli.errors import UserError, bad_store_url

DEFAULT_CLICKHOUSE_URL = "http://127.0.0.1:8123/?database=meshlens"  # the local collector's query endpoint

EPILOG = """examples:
  meshlens dashboards provision --grafana-url http://127.0.0.1:3000 --token "$GRAFANA_TOKEN"
      the datasource points at the local collector's query endpoint (http://127.0.0.1:8123/)
  meshlens dashboards provision --grafana-url http://grafana:3000 --user admin --password admin \\
      --clickhouse-url clickhouse://reader:secret@ch1:9000/meshlens --prometheus-url http://prometheus:9090
  meshlens dashboards write-files /etc/grafana/provisioning --clickhouse-url http://collector:8123/
      Grafana file provisioning: datasources/meshlens.yaml, dashboards/meshlens.yaml and the JSON
  meshlens dashboards list

provision is idempotent: fixed uids (datasource meshlens-clickhouse, folder meshlens,
dashboards meshlens-*), so running it again updates in place. Grafana needs the
ClickHouse plugin (grafana-clickhouse-datasource) installed. Environment:
MESHLENS_GRAFANA_URL, MESHLENS_GRAFANA_TOKEN, MESHLENS_GRAFANA_USER, MESHLENS_GRAFANA_PASSWORD,
MESHLENS_CLICKHOUSE_URL."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="install the Grafana dashboards (ClickHouse plugin) and datasources",
                       description="Grafana dashboards over the call records: provision them through Grafana's "
                                   "API, or write Grafana file-provisioning files.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    prov = actions.add_parser("provision", help="create or update datasource, folder and dashboards in Grafana",
                              description="Create or update the ClickHouse datasource, the meshlens folder and "
                                          "the dashboards through Grafana's HTTP API.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    prov.add_argument("--grafana-url", default=os.environ.get("MESHLENS_GRAFANA_URL"),
                      help="Grafana's base URL, e.g. http://127.0.0.1:3000 (env MESHLENS_GRAFANA_URL)")
    prov.add_argument("--token", default=os.environ.get("MESHLENS_GRAFANA_TOKEN"),
                      help="service account token (env MESHLENS_GRAFANA_TOKEN)")
    prov.add_argument("--user", default=os.environ.get("MESHLENS_GRAFANA_USER"),
                      help="basic auth user instead of a token (env MESHLENS_GRAFANA_USER)")
    prov.add_argument("--password", default=os.environ.get("MESHLENS_GRAFANA_PASSWORD"),
                      help="basic auth password (env MESHLENS_GRAFANA_PASSWORD)")
    prov.add_argument("--timeout", type=positive("seconds"), default=10.0,
                      help="seconds per Grafana request (default 10)")
    prov.add_argument("--write-files", metavar="DIR", type=Path,
                      help="write file-provisioning files to DIR instead of calling Grafana")
    _common(prov)
    prov.set_defaults(run=run_provision)

    files = actions.add_parser("write-files", help="write Grafana file-provisioning YAML and dashboard JSON",
                               description="Write DIR/datasources/meshlens.yaml, DIR/dashboards/meshlens.yaml "
                                           "and the dashboards' JSON under DIR/dashboards/meshlens/.",
                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    files.add_argument("dir", type=Path, metavar="DIR", help="Grafana's provisioning directory (or a copy of it)")
    _common(files)
    files.set_defaults(run=run_write_files)

    listing = actions.add_parser("list", help="list the dashboards (uid, title, panels)")
    listing.set_defaults(run=run_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clickhouse-url", "--store", dest="clickhouse_url",
                   default=os.environ.get("MESHLENS_CLICKHOUSE_URL", DEFAULT_CLICKHOUSE_URL),
                   help="what the datasource connects to, as Grafana reaches it: the collector's query endpoint "
                        "http://HOST:8123/, a ClickHouse server http(s)://HOST:8123/?database=DB or "
                        f"clickhouse://USER:PASS@HOST:9000/DB (default {DEFAULT_CLICKHOUSE_URL})")
    p.add_argument("--prometheus-url", help="also create a Prometheus datasource (for the meshlens-itself dashboard)")
    p.add_argument("--folder", default="meshlens", help="folder title (uid meshlens; default meshlens)")
    p.add_argument("--datasource-name", default=None, help="ClickHouse datasource name (default meshlens ClickHouse)")
    p.add_argument("--json-path", help="write-files: the dashboards' JSON directory as Grafana sees it "
                                       "(default: the absolute path written)")


def _names(args: argparse.Namespace):
    from meshlens.dashboards.datasources import Names

    if args.datasource_name:
        return Names(datasource_name=args.datasource_name, folder_title=args.folder)
    return Names(folder_title=args.folder)


def _target(args: argparse.Namespace):
    from meshlens.dashboards.datasources import ClickHouseTarget, ProvisionError

    try:
        return ClickHouseTarget.from_url(args.clickhouse_url)
    except ProvisionError as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise bad_store_url(args.clickhouse_url, e, "--clickhouse-url") from None


def run_provision(args: argparse.Namespace) -> int:
    if args.write_files is not None:
        args.dir = args.write_files
        return run_write_files(args)
    from meshlens.dashboards.datasources import ProvisionError
    from meshlens.dashboards.provision import connect, provision

    if not args.grafana_url:
        raise UserError("--grafana-url is required (or MESHLENS_GRAFANA_URL)")
    if args.token and args.user:
        raise UserError("give --token or --user/--password, not both")
    ch = _target(args)
    try:
        api = connect(args.grafana_url, args.token, args.user, args.password, args.timeout)
        report = provision(api, args.grafana_url, ch, _names(args), args.prometheus_url)
    except ProvisionError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # urlsplit's, on a --grafana-url it cannot split
        raise UserError(f"invalid --grafana-url {args.grafana_url!r}: {e}") from None
    for line in report.lines():
        print(line)
    return 0


def run_write_files(args: argparse.Namespace) -> int:
    from meshlens.dashboards.datasources import ProvisionError, write_files

    try:
        paths = write_files(args.dir, _target(args), _names(args), args.prometheus_url, args.json_path)
    except ProvisionError as e:
        raise UserError(str(e)) from None
    for path in paths:
        print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from meshlens.dashboards import load_all

    for uid, d in load_all().items():
        n = sum(1 for p in d["panels"] if p["type"] != "row")
        sys.stdout.write(f"{uid:<20} {n:>3} panels  {d['title']}\n")
    return 0

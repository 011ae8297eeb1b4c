"""`meshlens collector`: receive calls and spans, store them, serve queries."""
from __future__ import annotations

import argparse
import dataclasses

from meshlens.config import resolve

EPILOG = """examples:
  meshlens collector
      embedded store under ~/.local/share/meshlens, OTLP on 127.0.0.1:4317/4318,
      ClickHouse HTTP query endpoint on 127.0.0.1:8123
  meshlens collector --store clickhouse://default:secret@ch1:9000/meshlens --host 0.0.0.0
  meshlens collector --store 'http://ch1:8123/?database=meshlens&cluster=prod'
  MESHLENS_STORE=chdb:/data/meshlens meshlens collector --config collector.yaml
  meshlens collector --forward-otlp http://tempo:4318 --forward-queue-spans 200000
      also send every accepted span (OTLP's, and the sidecars' calls with trace
      context) to Tempo, Jaeger or an OpenTelemetry Collector by OTLP/HTTP

every option can also be given as MESHLENS_<OPTION> (e.g. MESHLENS_OTLP_HTTP_PORT=14318)
or in the --config YAML file (otlp_http_port: 14318); flags win over the environment,
which wins over the file."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from meshlens.collector.config import CollectorConfig

    p = sub.add_parser("collector", help="receive OTLP spans and call batches into ClickHouse",
                       description="Receive OTLP spans (HTTP 4318, gRPC 4317) and call batches from "
                                   "sidecars and taps (/v1/calls), spool them, and insert them into the store.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of settings")
    for f in dataclasses.fields(CollectorConfig):
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else "", str)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                       metavar=f.name.upper(), help=f.metadata.get("help", ""))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshlens.collector.config import CollectorConfig
    from meshlens.collector.service import StartupError, run as run_collector
    from meshlens.cli.errors import UserError

    cfg = resolve(CollectorConfig, vars(args), config_file=args.config)
    _check_ports(cfg)
    try:
        run_collector(cfg)
    except StartupError as e:
        raise UserError(str(e)) from None
    return 0


def _check_ports(cfg) -> None:  # type: ignore[no-untyped-def]
    """The listeners' ports, checked before the store is opened: one line naming the flag if one is taken."""
    from meshlens.cli.listen import check_ports
    from meshlens.collector.stores import parse_store_url

    check_ports(cfg.host, {"--otlp-http-port": cfg.otlp_http_port, "--otlp-grpc-port": cfg.otlp_grpc_port})
    try:
        embedded = parse_store_url(cfg.store)["scheme"] == "chdb" if cfg.store else True
    except ValueError:  # reported by the collector itself, with its wording
        return
    if embedded:  # the query endpoint serves the embedded store only
        check_ports(cfg.query_host, {"--query-port": cfg.query_port})

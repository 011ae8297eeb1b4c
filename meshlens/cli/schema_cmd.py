"""`meshlens schema`: print the DDL meshlens would run on a store."""
from __future__ import annotations

import argparse

from meshlens.cli.errors import UserError, bad_store_url

EPILOG = """examples:
  meshlens schema                                     # embedded store, database meshlens
  meshlens schema --store 'clickhouse://ch1:9000/meshlens?cluster=prod'
  meshlens schema --cluster prod --calls-retention-days 90 > meshlens.sql

the statements are idempotent (IF NOT EXISTS); `meshlens collector` runs them
itself as versioned migrations, so printing them is for review or for DBAs."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the ClickHouse DDL for a store URL and cluster",
                       description="Print the DDL (database, calls, otel_traces, trace-id lookup, mesh_changes) "
                                   "for a store, one statement per block, ';'-terminated.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="chdb:", help="store URL; its database and ?cluster= are used")
    p.add_argument("--cluster", help="cluster name for ON CLUSTER / Replicated / Distributed (overrides ?cluster=)")
    p.add_argument("--calls-retention-days", type=int, default=30, help="TTL of calls in days (0 = forever)")
    p.add_argument("--traces-retention-days", type=int, default=7, help="TTL of spans in days (0 = forever)")
    p.add_argument("--changes-retention-days", type=int, default=365,
                   help="TTL of the control plane's changes (mesh_changes) in days (0 = forever)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshlens.collector.schema import Layout, Retention, full_ddl
    from meshlens.collector.stores import parse_store_url

    try:
        parts = parse_store_url(args.store)
    except ValueError as e:
        raise bad_store_url(args.store, e) from None
    if min(args.calls_retention_days, args.traces_retention_days, args.changes_retention_days) < 0:
        raise UserError("retention days must be 0 or more")
    try:
        layout = Layout(parts["database"], args.cluster if args.cluster is not None else parts["cluster"],
                        Retention(args.calls_retention_days, args.traces_retention_days,
                                  args.changes_retention_days))
        statements = full_ddl(layout)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(";\n\n".join(s.strip() for s in statements) + ";")
    return 0

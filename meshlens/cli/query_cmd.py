"""`meshlens query "SQL"`: run a query against a store and print the result."""
from __future__ import annotations

import argparse
import csv
import json
import sys

from meshlens.cli.errors import UserError, bad_store_url

EPILOG = """examples:
  meshlens query "SELECT dst_service, count() FROM calls GROUP BY dst_service"
  meshlens query --format csv "SELECT * FROM calls LIMIT 10" > calls.csv
  meshlens query --store clickhouse://ch1:9000/meshlens --format json "SHOW TABLES"

without --store (or MESHLENS_STORE) it asks the local collector's query endpoint
(http://127.0.0.1:8123/) and, if no collector runs, opens the embedded store directly."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="run SQL against the store and print the rows",
                       description="Run one SQL statement against the store and print its result.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sql", help="the statement (reads from stdin when '-')")
    p.add_argument("--store", help="store URL (default: the local collector, else the embedded store)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="output: aligned table (default), CSV with a header, or JSON lines")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshlens.collector.stores import StoreError, StoreUnavailable, connect, reader_store_url, redact

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not sql.strip():
        raise UserError("empty query")
    url = args.store if args.store is not None else reader_store_url()
    try:
        store = connect(url)
    except ValueError as e:
        raise bad_store_url(url, e) from None
    except StoreError as e:
        raise UserError(str(e)) from None
    try:
        try:
            store.use_database()
        except StoreUnavailable as e:
            raise UserError(str(e)) from None
        except StoreError as e:
            raise UserError(f"the store at {redact(url)} has no database {store.database!r} ({e}); "
                            f"start the collector on it once to create it") from None
        try:
            names, rows = store.query_table(sql)
        except StoreError as e:
            raise UserError(str(e)) from None
    finally:
        store.close()
    out = sys.stdout
    if args.format == "csv":
        w = csv.writer(out)
        w.writerow(names)
        w.writerows(rows)
    elif args.format == "json":
        for r in rows:
            out.write(json.dumps(dict(zip(names, r)), default=str) + "\n")
    else:
        out.write(format_table(names, rows))
    return 0


def format_table(names: list[str], rows: list[tuple]) -> str:
    """An aligned text table, numbers right-aligned, with the row count under it."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows) and rows
               for i in range(len(names))]
    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    out = [line(list(names)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def _cell(v: object) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v).replace("\n", "\\n")

"""`meshlens analyze` (traffic model) and `meshlens recommend` (policies with evidence)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshlens.cli.errors import UserError, bad_store_url

ANALYZE_EPILOG = """examples:
  meshlens analyze                               # service graph and routes, all recorded calls
  meshlens analyze --window 1h --service catalog # last hour, calls to or from catalog
  meshlens analyze --since 2026-11-25T08:00 --until 2026-11-25T09:00 --format json

latencies are from one observer per caller → callee edge (the caller's sidecar
first, then the callee's, then the tap, then OTLP spans), never double counted."""

RECOMMEND_EPILOG = """examples:
  meshlens recommend                              # a table of every recommendation
  meshlens recommend --service payments --window 6h
  meshlens recommend --format yaml > policies.yaml  # Istio VirtualService/DestinationRule/PeerAuthentication
  meshlens recommend --format json --store http://collector:8123/
  meshlens recommend --service cart --diff        # what --apply would store in the control plane
  meshlens recommend --service cart --apply --reason "try the recommended timeouts"

--apply stores the recommended policies in the control plane (--control, MESHLENS_CONTROL), each with
its evidence and what-if as annotations, and puts each service whose policies change in dry-run (never
straight into enforce); applying the same recommendations again changes nothing. Then:
meshlens dryrun report SERVICE, and meshlens mode set SERVICE enforce --guard.

each recommendation carries its evidence (window, n, figures, confidence, reason);
where the data is too thin it says "not enough data (n=…)" instead of guessing."""


def _common(p: argparse.ArgumentParser, service: bool = True) -> None:
    p.add_argument("--store", help="store URL (default: MESHLENS_STORE, the local collector, else the embedded store)")
    if service:
        p.add_argument("--service", help="only this destination service (analyze: calls to or from it)")
    p.add_argument("--window", help="the last DURATION of calls, e.g. 15m, 1h, 7d (default: all recorded calls)")
    p.add_argument("--since", help="start: ISO 8601 time (UTC unless zoned) or a duration ago, e.g. 2h")
    p.add_argument("--until", help="end: ISO 8601 time or a duration ago (default: now)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="service graph and per-route traffic model",
                       description="Show the service graph (rate, error rate, p50/p90/p99/p99.9 per caller → callee) "
                                   "and the per-route breakdown with templated routes.",
                       epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    a.add_argument("--format", choices=["table", "json"], default="table", help="aligned tables (default) or JSON")
    a.set_defaults(run=run_analyze)
    r = sub.add_parser("recommend", help="timeouts, retries, outlier detection and mTLS, with evidence",
                       description="Recommend timeouts, retries, circuit breaking and mTLS from recorded calls.",
                       epilog=RECOMMEND_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(r)
    r.add_argument("--format", choices=["table", "yaml", "json"], default="table",
                   help="table (default), Istio YAML with evidence as comments, or JSON")
    act = r.add_mutually_exclusive_group()
    act.add_argument("--apply", action="store_true",
                     help="store the recommended policies in the control plane and put their services in dry-run")
    act.add_argument("--diff", action="store_true", help="show what --apply would change, store nothing "
                                                          "(exit 1 when something would)")
    r.add_argument("--reason", help="why, for the history (--apply; default: the window and sample used)")
    r.add_argument("--control", metavar="URL", help="the control plane (default: MESHLENS_CONTROL, else "
                                                   "http://127.0.0.1:15010)")
    r.add_argument("--token", help="bearer token (default: MESHLENS_TOKEN)")
    r.add_argument("--ca", metavar="PEM", help="CA an https control plane's certificate is checked against")
    r.set_defaults(run=run_recommend)


def window_from(args: argparse.Namespace):
    from meshlens.analysis.window import Window, parse_duration, parse_time

    try:
        if args.window and (args.since or args.until):
            raise UserError("use either --window or --since/--until, not both")
        if args.window:
            return Window.last(parse_duration(args.window))
        return Window(parse_time(args.since) if args.since else None,
                      parse_time(args.until) if args.until else None)
    except ValueError as e:
        raise UserError(str(e)) from None


def _open(args: argparse.Namespace):
    from meshlens.collector.stores import StoreError, StoreUnavailable, connect, reader_store_url, redact

    url = args.store if args.store is not None else reader_store_url()
    try:
        store = connect(url)
        store.use_database()
        store.query_rows("SELECT 1 FROM calls LIMIT 0")
    except ValueError as e:
        raise bad_store_url(url, e) from None
    except StoreUnavailable as e:  # names the store and why
        raise UserError(str(e)) from None
    except StoreError as e:
        if "UNKNOWN_TABLE" not in str(e) and "UNKNOWN_DATABASE" not in str(e):
            raise UserError(str(e)) from None
        raise UserError(f"store {redact(url)} has no calls table ({e}); start the collector once to create it") from None
    return store


def _scoped(args: argparse.Namespace, fn, service: str | None = None) -> Any:
    from meshlens.analysis.scope import NoData, UnknownService
    from meshlens.collector.stores import StoreError

    window = window_from(args)
    store = _open(args)
    try:
        return fn(store, window, service or args.service)
    except (NoData, UnknownService) as e:
        raise UserError(str(e)) from None
    except StoreError as e:
        raise UserError(f"query failed: {e}") from None
    finally:
        store.close()


def run_analyze(args: argparse.Namespace) -> int:
    from meshlens.analysis.recommend import analyze
    from meshlens.cli.query_cmd import format_table

    model = _scoped(args, analyze)
    if args.format == "json":
        print(json.dumps({"window": model.window, "n": model.n,
                          "edges": model.edges.to_dict(orient="records"),
                          "routes": model.routes.to_dict(orient="records")}, default=str, indent=1))
        return 0
    out = sys.stdout
    out.write(f"window {model.window}, {model.n} calls (all observers)\n\nservice graph\n")
    out.write(format_table(*_rows(model.edges)))
    out.write("\nroutes\n")
    out.write(format_table(*_rows(model.routes)))
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    from meshlens.analysis.istio import istio_yaml
    from meshlens.analysis.recommend import recommend
    from meshlens.cli.query_cmd import format_table

    if args.apply or args.diff:
        from meshlens.cli.recommend_apply import apply_recommendations

        return apply_recommendations(args)
    yaml = args.format == "yaml"
    report = _scoped(args, lambda store, window, service: recommend(store, window, service, paths=yaml))
    if yaml:
        sys.stdout.write(istio_yaml(report))
    elif args.format == "json":
        sys.stdout.write(report.as_json() + "\n")
    else:
        df = report.frame()
        warnings = [w for ws in df["warnings"] if ws for w in ws.split(" | ")]
        shown = df[["kind", "caller", "callee", "method", "route", "recommendation", "confidence", "n", "reason"]]
        sys.stdout.write(f"window {report.window}, {report.n} calls\n")
        sys.stdout.write(format_table(*_rows(shown)))
        for w in warnings:
            sys.stdout.write(f"warning: {w}\n")
    return 0


def _rows(df) -> tuple[list[str], list[tuple]]:
    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4 if abs(v) < 10 else 1)
        return v.item() if hasattr(v, "item") else v
    return list(df.columns), [tuple(cell(v) for v in row) for row in df.itertuples(index=False)]

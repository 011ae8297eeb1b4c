"""Benchmark: a full `meshlens recommend` run against a plain scan and the naive pandas approach.

    .venv/bin/python bench/analysis.py [--calls 10000000] [--naive-sample 1000000] [--repeat 2] [--write-routes]

N calls are generated inside ClickHouse (INSERT … SELECT … FROM numbers(N)) into
a fresh embedded store. Then, in the same run:

- plain scan (lower bound): SELECT dst_service, count() FROM calls GROUP BY dst_service;
- meshlens: the whole `meshlens recommend --format json` command (connect, route
  detection, graph, timeouts, retries, outliers, pools, mTLS), output discarded;
- naive: load the rows into pandas and compute the same kind of figures there
  (route templating, per-edge quantiles, per-route retry buckets, per-instance
  failure rates). Run on --naive-sample rows and scaled linearly to N (said so
  in the output) when the sample is smaller than N.

With --write-routes the templated routes are then written back into the
`route` column (one ALTER TABLE … UPDATE, as a background job could) and
recommend is timed again: what re-templating in SQL on every run costs.

Targets (issue 5): meshlens ≤ 10 s on 10M calls, within 5× the plain scan, ≥ 10× faster than naive.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshlens.collector.schema import Layout, migrate  # noqa: E402
from meshlens.collector.stores.embedded import EmbeddedStore  # noqa: E402

NAIVE_COLUMNS = ("time, src_service, dst_service, observer, method, path, duration_ns, status, error, tls, "
                 "dst_addr, dst_port, attributes")


def generate_sql(n: int, t0_ns: int, span_s: int = 3600) -> str:
    """N calls: 8 callers × 12 callees, 4 instances each, 5 routes with numeric ids, 2% 503s, 0.3% resets,
    one instance of api3 failing 30%, 10% of rows also seen by the server side."""
    return f"""INSERT INTO meshlens.calls (time, duration_ns, observer, src_service, src_addr, dst_service, dst_addr,
    dst_port, protocol, method, path, status, error, tls)
SELECT fromUnixTimestamp64Nano(toInt64({t0_ns} + intDiv(number * {span_s * 10**9}, {n}))) AS time,
       toUInt64(1e6 * exp(3 + 0.5 * randNormal(0, 1))) AS duration_ns,
       if(number % 10 = 0, 'server', 'client') AS observer,
       concat('svc', toString(h % 8)) AS src_service,
       concat('10.1.0.', toString(h % 8)) AS src_addr,
       concat('api', toString(intDiv(h, 8) % 12)) AS dst_service,
       concat('10.0.', toString(intDiv(h, 8) % 12), '.', toString(intDiv(h, 96) % 4)) AS dst_addr,
       8080 AS dst_port, 'http/1.1' AS protocol,
       ['GET', 'GET', 'GET', 'POST', 'PUT'][intDiv(h, 384) % 5 + 1] AS method,
       concat('/r', toString(intDiv(h, 1920) % 5), '/', toString(intDiv(h, 9600) % 100000)) AS path,
       if(rand() % 100 < 2 OR (dst_service = 'api3' AND dst_addr = '10.0.3.2' AND rand(1) % 100 < 30), 503, 200)
           AS status,
       if(rand(2) % 1000 < 3, 'reset', '') AS error,
       rand(3) % 10 != 0 AS tls
FROM (SELECT number, cityHash64(number) AS h FROM numbers({n}))"""


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def naive(store: EmbeddedStore, sample: int) -> tuple[float, float, int]:
    """Load `sample` rows into pandas and compute the figures there; (load s, compute s, rows)."""
    import numpy as np

    load_s, df = timed(lambda: store.query_arrow(f"SELECT {NAIVE_COLUMNS} FROM calls LIMIT {sample}").to_pandas())

    def compute() -> None:
        d = df
        rank = d["observer"].map({"client": 0, "server": 1, "wire": 2, "otlp": 3})
        best = rank.groupby([d["src_service"], d["dst_service"]]).transform("min")
        d = d[rank == best].copy()
        d["route"] = d["path"].str.replace(r"/(?:[0-9]+|[0-9a-fA-F]{8,})(?=/|$)", "/{id}", regex=True)
        failed = (d["error"] != "") | (d["status"] >= 500)
        d["failed"] = failed
        d["healthy"] = ~failed
        d["instance"] = d["dst_addr"] + ":" + d["dst_port"].astype(str)
        g = d.groupby(["src_service", "dst_service"])
        g["duration_ns"].quantile([0.5, 0.9, 0.99, 0.999])
        g["failed"].mean()
        r = d.groupby(["src_service", "dst_service", "method", "route"])
        r["duration_ns"].quantile(0.999)
        d[d["healthy"]].groupby(["src_service", "dst_service", "method", "route"])["duration_ns"].max()
        d["b"] = d["time"].astype("int64") // 10**10
        per = d.groupby(["src_service", "dst_service", "method", "route", "b"]).agg(
            n=("failed", "size"), f=("failed", "sum"))
        per["rec"] = np.where(per["n"] > 1, per["f"] * (per["n"] - per["f"]) / (per["n"] - 1).clip(lower=1), 0)
        per.groupby(level=[0, 1, 2, 3]).sum()
        inst = d.groupby(["dst_service", "instance", "b"]).agg(n=("failed", "size"), f=("failed", "sum"))
        inst.groupby(level=[0, 1]).sum()
        d.groupby(["dst_service", "src_service"])["tls"].agg(["sum", "size"])

    compute_s, _ = timed(compute)
    return load_s, compute_s, len(df)


def write_routes(path: str) -> float:
    """Fill the `route` column with the templated route once (a mutation), as a write-back job would; seconds."""
    from meshlens.analysis import Window, open_scope

    store = EmbeddedStore(path)
    store.use_database()
    try:
        t = time.perf_counter()
        scope = open_scope(store, Window())
        store.command(f"ALTER TABLE calls UPDATE route = {scope.route_expr} WHERE route = ''",
                      {"mutations_sync": 1})
        return time.perf_counter() - t
    finally:
        store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000_000)
    ap.add_argument("--naive-sample", type=int, default=1_000_000,
                    help="rows loaded into pandas for the naive approach (scaled to --calls)")
    ap.add_argument("--dir", help="data directory, kept afterwards (default: a temporary one, removed)")
    ap.add_argument("--repeat", type=int, default=1, help="run recommend this many times and keep the best")
    ap.add_argument("--write-routes", action="store_true",
                    help="then write the templated routes back into `route` and time recommend again")
    args = ap.parse_args()
    path = args.dir or os.path.join(tempfile.mkdtemp(prefix="meshlens-bench-"), "chdb")
    store = EmbeddedStore(path)
    migrate(store, Layout())
    store.use_database()
    t0_ns = int((datetime.now(timezone.utc).timestamp() - 2 * 3600) * 1e9)
    gen_s, _ = timed(lambda: store.command(generate_sql(args.calls, t0_ns)))
    store.command("OPTIMIZE TABLE meshlens.calls FINAL")
    n = int(store.query_rows("SELECT count() FROM calls")[0][0])
    print(f"generated {n:,} calls in {gen_s:.1f}s ({platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()})")

    scan_s, _ = timed(lambda: store.query_rows("SELECT dst_service, count() FROM calls GROUP BY dst_service"))
    scan_s = min(scan_s, timed(lambda: store.query_rows(
        "SELECT dst_service, count() FROM calls GROUP BY dst_service"))[0])
    sample = min(args.naive_sample, n)
    load_s, compute_s, rows = naive(store, sample)
    store.close()

    from meshlens.cli import analysis_cmd

    p = argparse.ArgumentParser(prog="meshlens")
    analysis_cmd.add_parser(p.add_subparsers(dest="command"))
    cli = p.parse_args(["recommend", "--store", f"chdb:{path}", "--format", "json"])

    def run_recommend() -> tuple[float, int]:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            s, _ = timed(lambda: cli.run(cli))
        return s, sink.getvalue().count('"kind"')

    rec_s, recs = min(run_recommend() for _ in range(args.repeat))
    if args.write_routes:
        write_s, after_s = write_routes(path), min(run_recommend()[0] for _ in range(args.repeat))
        print(f"route write-back (ALTER TABLE calls UPDATE route, mutations_sync=1): {write_s:8.2f} s")
        print(f"meshlens recommend, routes templated in SQL / written back: {rec_s:.2f} s / {after_s:.2f} s"
              f"   = {rec_s / after_s:.2f}x")

    scale = n / rows
    naive_s = (load_s + compute_s) * scale
    print(f"plain scan (GROUP BY dst_service, best of 2): {scan_s:8.2f} s")
    print(f"meshlens recommend (full command, {recs} recommendations): {rec_s:8.2f} s"
          f"   = {rec_s / scan_s:.1f}x the plain scan")
    note = "" if rows == n else f" (measured on {rows:,} rows: load {load_s:.2f}s + compute {compute_s:.2f}s, ×{scale:.0f})"
    print(f"naive pandas (load rows, group in pandas){note}: {naive_s:8.2f} s"
          f"   = {naive_s / rec_s:.1f}x slower than meshlens")
    print(f"targets: recommend <= 10 s: {'met' if rec_s <= 10 else 'NOT met'}; <= 5x scan: "
          f"{'met' if rec_s <= 5 * scan_s else 'NOT met'}; >= 10x faster than naive: "
          f"{'met' if naive_s >= 10 * rec_s else 'NOT met'}")
    if not args.dir:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

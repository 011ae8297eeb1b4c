"""A question's scope: the store, the window, an optional service, and the calls it sees.

`Scope.calls()` is the one SQL source every analysis reads: the window, the
observer rule (analysis.window) and the templated route (analysis.routes)
applied in ClickHouse, so nothing downstream can double count or re-template.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from meshlens.collector.spans import GRPC_SERVER_ERRORS
from meshlens.collector.stores import Store

from meshlens.analysis.routes import detect_rules, route_sql
from meshlens.analysis.window import (CALLER_SIDE, CALLER_SQL, INSTANCE_SQL, EdgeObservers, Window, edge_observers_sql,
                             observer_filter, quote)

# A gRPC call is answered HTTP 200 whatever its outcome: its grpc-status says. The codes that are the server's
# failures (OpenTelemetry's RPC conventions, collector.spans.GRPC_SERVER_ERRORS) are exactly those Envoy maps to a
# 5xx (grpcToHttpStatus: UNKNOWN, INTERNAL, DATA_LOSS 500, UNIMPLEMENTED 501, UNAVAILABLE 503, DEADLINE_EXCEEDED
# 504), so its outlier detection counts them too; the others (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's,
# as a 4xx is. grpc_status is -1 on every call that is not gRPC.
GRPC_FAILED: tuple[int, ...] = tuple(sorted(GRPC_SERVER_ERRORS))
_GRPC_FAILED_LIST = ", ".join(map(str, GRPC_FAILED))
# A failure as the caller sees it: no response (an error class), a 5xx, or a gRPC server error. The one
# definition every analysis counts failures with (error rates, the graph, outliers, what-ifs, mode figures).
FAILED_SQL = f"(error != '' OR status >= 500 OR grpc_status IN ({_GRPC_FAILED_LIST}))"
HEALTHY_SQL = f"(error = '' AND status < 500 AND grpc_status NOT IN ({_GRPC_FAILED_LIST}))"


class NoData(LookupError):
    """The store, or the window, holds no calls: nothing can be analysed."""


class UnknownService(LookupError):
    """The named service appears in no call of the window."""


@dataclass(frozen=True, slots=True)
class Scope:
    store: Store
    window: Window
    service: str | None
    route_expr: str
    n: int
    seconds: float
    edges: EdgeObservers

    def where(self, side: str = "dst") -> str:
        """Window and service condition; side 'dst' = calls to the service, 'either' = to or from it."""
        w = self.window.where()
        if self.service is None:
            return w
        s = quote(self.service)
        if side == "either":
            return f"{w} AND (dst_service = {s} OR src_service = {s})"
        return f"{w} AND dst_service = {s}"

    def calls(self, prefer: tuple[str, ...] = CALLER_SIDE, side: str = "dst") -> str:
        """SQL subquery: the calls in scope, one observer per edge, with caller, instance and route_t."""
        return (f"(SELECT *, {CALLER_SQL} AS caller, {INSTANCE_SQL} AS instance, {self.route_expr} AS route_t "
                f"FROM calls WHERE {self.where(side)} AND {observer_filter(self.edges, prefer, self.window.where())})")

    def frame(self, sql: str) -> pd.DataFrame:
        """Run an aggregating query and hand its (small) result to pandas."""
        return self.store.query_arrow(sql).to_pandas()

    def label(self) -> str:
        return self.window.describe()


def open_scope(store: Store, window: Window, service: str | None = None) -> Scope:
    """Check there is something to analyse and prepare the route templating; raises NoData, UnknownService."""
    w = window.where()
    total, lo, hi = store.query_rows(
        f"SELECT count(), toUnixTimestamp64Nano(min(time)), toUnixTimestamp64Nano(max(time)) FROM calls WHERE {w}")[0]
    if int(total) == 0:
        any_rows = int(store.query_rows("SELECT count() FROM calls")[0][0])
        if not any_rows:
            raise NoData("the store holds no calls yet: start the collector and a proxy or tap first")
        raise NoData(f"no calls in the window {window.describe()} ({any_rows} calls outside it)")
    if service is not None:
        found = int(store.query_rows(
            f"SELECT count() FROM calls WHERE {w} AND (dst_service = {quote(service)} OR src_service = {quote(service)})")[0][0])
        if not found:
            names = [r[0] for r in store.query_rows(
                f"SELECT DISTINCT toString(dst_service) AS s FROM calls WHERE {w} ORDER BY s LIMIT 10")]
            raise UnknownService(f"no calls to or from service {service!r} in {window.describe()}"
                                 f" (services seen: {', '.join(names)})")
    since = window.since.timestamp() if window.since else int(lo) / 1e9
    until = window.until.timestamp() if window.until else int(hi) / 1e9
    rules = detect_rules(store, w, int(total))
    edges = {(c, d): frozenset(obs) for c, d, obs in store.query_rows(edge_observers_sql(w))}
    return Scope(store, window, service, route_sql(rules), int(total), max(until - since, 1.0), edges)

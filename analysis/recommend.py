"""The whole run: traffic model and every recommendation for one scope, as dataclasses and DataFrames."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pandas as pd

from meshlens.collector.stores import Store

from meshlens.analysis import graph
from meshlens.analysis.evidence import Recommendation
from meshlens.analysis.mtls import recommend_mtls
from meshlens.analysis.outliers import recommend_outliers
from meshlens.analysis.pools import recommend_pools
from meshlens.analysis.retries import recommend_retries
from meshlens.analysis.route_stats import route_stats
from meshlens.analysis.scope import Scope, open_scope
from meshlens.analysis.timeouts import recommend_timeouts
from meshlens.analysis.window import Window


@dataclass(frozen=True)
class TrafficModel:
    window: str
    n: int
    edges: pd.DataFrame
    routes: pd.DataFrame


RouteKey = tuple[str, str, str, str]  # caller, callee, method, route


@dataclass(frozen=True)
class Report:
    window: str
    n: int
    recommendations: list[Recommendation]
    # Recorded paths (a sample, analysis.route_stats.PATH_SAMPLE) per route: what a
    # uri match written for the route must match (analysis.istio).
    paths: dict[RouteKey, tuple[str, ...]] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """One row per recommendation: what, for whom, the policy, confidence, n and reason."""
        rows = []
        for r in self.recommendations:
            rows.append({"kind": r.kind, "caller": r.target.get("caller", ""), "callee": r.target.get("callee", ""),
                         "method": r.target.get("method", ""), "route": r.target.get("route", ""),
                         "recommendation": summary(r), "confidence": r.evidence.confidence, "n": r.evidence.n,
                         "reason": r.evidence.reason, "warnings": " | ".join(r.warnings)})
        return pd.DataFrame(rows, columns=["kind", "caller", "callee", "method", "route", "recommendation",
                                           "confidence", "n", "reason", "warnings"])

    def as_json(self) -> str:
        return json.dumps({"window": self.window, "n": self.n,
                           "recommendations": [r.as_dict() for r in self.recommendations]}, default=str, indent=1)


def summary(r: Recommendation) -> str:
    """The policy in a few words, or 'none'."""
    p = r.policy
    if p is None:
        return "none"
    if r.kind == "timeout":
        return f"timeout {p['timeout_s'] * 1000:g}ms"
    if r.kind == "retry":
        per = f", perTry {p['perTryTimeout_s'] * 1000:g}ms" if "perTryTimeout_s" in p else ""
        return f"retry attempts={p['attempts']}{per} on {p['retryOn']}"
    if r.kind == "outlier":
        return (f"eject {', '.join(p['eject'])} (consecutive5xx={p['consecutive5xxErrors']}, "
                f"maxEjection={p['maxEjectionPercent']}%)")
    if r.kind == "connection_pool":
        return f"maxConnections={p['tcp']['maxConnections']}, http2MaxRequests={p['http']['http2MaxRequests']}"
    return f"{p['verdict']} -> {p['mode']}"


def analyze(store: Store, window: Window = Window(), service: str | None = None) -> TrafficModel:
    """Service graph and per-route table (calls to or from `service` when given)."""
    scope = open_scope(store, window, service)
    return TrafficModel(scope.label(), scope.n, graph.edges(scope), graph.routes(scope))


def recommend(store: Store, window: Window = Window(), service: str | None = None,
              scope: Scope | None = None, paths: bool = True) -> Report:
    """Every recommendation for calls to `service` (all services when None).

    `paths=False` leaves `Report.paths` empty, which only `istio_yaml` reads (it then
    writes every route as a comment): cheaper where no YAML is written."""
    scope = scope or open_scope(store, window, service)
    whole = dataclasses.replace(scope, service=None)
    depth = graph.downstream_depth(scope.edges)
    stats = route_stats(whole, paths)
    mine = stats if service is None else stats[stats["callee"] == service]
    timeouts = recommend_timeouts(scope, mine)
    per_try = {(r.target["caller"], r.target["callee"], r.target["method"], r.target["route"]): r.policy["timeout_s"]
               for r in timeouts if r.policy}
    # Amplification needs the callee's own retries, which lie outside a one-service scope.
    retries = [r for r in recommend_retries(whole, per_try, depth, stats)
               if service is None or r.target["callee"] == service]
    recs = timeouts + retries + recommend_outliers(scope) + recommend_pools(scope) + recommend_mtls(scope)
    paths = {(r.caller, r.callee, r.method, r.route): tuple(r.paths) for r in stats.itertuples(index=False)}
    return Report(scope.label(), scope.n, recs, paths)

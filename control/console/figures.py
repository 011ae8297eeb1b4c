"""What the console shows of the recorded calls, from meshlens.analysis, as JSON-able dicts (blocking: run in a
thread, see calls.py).

The map is analysis' service graph (one observer per edge, the rule every analysis uses: analysis/window.py) with
each service placed by depth, callers before callees; a caller is *unmeshed* when no sidecar of its own recorded
its calls (no `client` row from it: only the callee's sidecar, the tap or spans saw them), as analysis/mtls.py
tells meshed callers from the others. A service's page adds its recommendations, each with the what-if of its
policy replayed on the same calls (analysis/whatif.py), its mTLS readiness and its dry-run report
(analysis/dryrun.py).
"""
from __future__ import annotations

import datetime as dt
import math
from typing import Any, Iterable

from meshlens.analysis import graph
from meshlens.analysis.dryrun import dryrun_report
from meshlens.analysis.evidence import Recommendation
from meshlens.analysis.mtls import readiness
from meshlens.analysis.recommend import analyze, recommend, summary
from meshlens.analysis.scope import NoData, Scope, open_scope
from meshlens.analysis.whatif import breaker_whatif, retry_whatif, timeout_whatif
from meshlens.analysis.window import Window
from meshlens.collector.stores import Store

__all__ = ["jsonable", "levels", "service_map", "service_traffic"]

_EDGE_FIGURES = ("n", "rate_per_s", "errors", "error_rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms")


def service_map(store: Store, window: Window) -> dict[str, Any]:
    """Every caller → callee edge of the window with its figures, and each service seen: its depth, meshed or not.
    Raises analysis' NoData when the window holds no calls."""
    model = analyze(store, window)
    edges = _edges(model.edges)
    meshed = {e["caller"] for e in edges if e["observer"] == "client"}
    names = {e["caller"] for e in edges} | {e["callee"] for e in edges}
    depth = levels((e["caller"], e["callee"]) for e in edges)
    callers = {e["caller"] for e in edges}
    services = [{"name": s, "level": depth.get(s, 0), "caller": s in callers, "meshed": s in meshed}
                for s in sorted(names)]
    for e in edges:
        e["caller_meshed"] = e["caller"] in meshed
    return {"window": model.window, "n": model.n, "edges": edges, "services": services}


def levels(pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Each service's column on the map: 0 for one nobody calls, else one past its deepest caller (a cycle is cut
    where it closes, so each service of a loop still gets a column)."""
    callers: dict[str, set[str]] = {}
    for a, b in pairs:
        callers.setdefault(a, set())
        if a != b:
            callers.setdefault(b, set()).add(a)
    memo: dict[str, int] = {}

    def level(s: str, path: frozenset[str]) -> int:
        if s not in memo:
            memo[s] = max((1 + level(c, path | {s}) for c in sorted(callers[s]) if c not in path), default=0)
        return memo[s]

    return {s: level(s, frozenset()) for s in sorted(callers)}


def service_traffic(store: Store, window: Window, service: str, stored: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls to and from `service`, its recommendations with evidence and what-if, its mTLS readiness, and its
    dry-run report against `stored` (its policy documents: the what-if kept with each) or, without calls in dry-run,
    why there is none. Raises analysis' NoData or UnknownService when the window holds none of its calls."""
    scope = open_scope(store, window, service)
    edges = _edges(graph.edges(scope))
    report = recommend(store, window, service, scope=scope, paths=False)
    recs = [{**jsonable(r.as_dict()), "summary": summary(r), "whatif": _whatif(scope, r)}
            for r in report.recommendations]
    ready = [jsonable(r.as_dict()) for r in readiness(scope) if r.service == service]
    try:
        dryrun: Any = jsonable(dryrun_report(store, window, service, stored, scope).as_dict())
    except NoData as e:
        dryrun = str(e)
    return {"window": scope.label(), "n": scope.n, "edges": edges, "recommendations": recs,
            "readiness": ready[0] if ready else None, "dryrun": dryrun}


def _edges(frame: Any) -> list[dict[str, Any]]:
    return [{"caller": str(r["caller"]), "callee": str(r["callee"]), "observer": str(r["observer"]),
             **{k: jsonable(r[k]) for k in _EDGE_FIGURES}, "confidence": str(r["confidence"])}
            for r in frame.to_dict(orient="records")]


def _whatif(scope: Scope, rec: Recommendation) -> dict[str, Any] | None:
    """The recommended policy replayed on the calls it is for: what it would have done, in figures and a sentence."""
    p, t = rec.policy, rec.target
    if p is None:
        return None
    if rec.kind == "timeout":
        row = _row(timeout_whatif(scope, p["timeout_s"], t["callee"]), t)
        if row is None:
            return None
        return {**row, "says": f"{row['cut']} of {row['n']} calls would have been cut at {p['timeout_s'] * 1000:g} ms, "
                               f"{row['cut_ok']} of them calls that succeeded"}
    if rec.kind == "retry":
        row = _row(retry_whatif(scope, p["attempts"], t["callee"]), t)
        if row is None or row["recovered"] is None:
            return row
        return {**row, "says": f"of {row['transient_failures']} transient failures, ~{row['recovered']:.0f} "
                               f"({row['recovered_lo']:.0f} to {row['recovered_hi']:.0f}) would have been recovered, "
                               f"for ~{row['retries_sent']:.0f} retries ({row['extra_load_share']:.2%} more calls)"}
    if rec.kind == "outlier":
        df = breaker_whatif(scope, p["consecutive5xxErrors"], callee=t["callee"])
        trips, rejected, failed = (int(df[c].sum()) for c in ("trips", "rejected", "rejected_failed"))
        return {"instances": jsonable(df.to_dict(orient="records")), "trips": trips, "rejected": rejected,
                "rejected_failed": failed,
                "says": f"{trips} ejection(s) after {p['consecutive5xxErrors']} failures in a row; {rejected} calls "
                        f"would have gone to other instances, {failed} of them failures on the ejected one"}
    return None


def _row(frame: Any, target: dict[str, str]) -> dict[str, Any] | None:
    for r in frame.to_dict(orient="records"):
        if all(str(r.get(k)) == target.get(k) for k in ("caller", "callee", "method", "route")):
            return jsonable(r)
    return None


def jsonable(value: Any) -> Any:
    """What JSON can carry and a browser's JSON.parse reads: numpy and pandas scalars as numbers, NaN and infinity
    as null (json.dumps would write NaN), times as ISO text, tuples as lists, keys as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):  # a numpy array
        return jsonable(value.tolist())
    if hasattr(value, "isoformat"):  # a pandas Timestamp
        return value.isoformat()
    return str(value)

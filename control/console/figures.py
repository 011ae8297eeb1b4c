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
from typing import Any

from meshlens.analysis import graph
from meshlens.analysis.dryrun import dryrun_report
from meshlens.analysis.evidence import Recommendation
from meshlens.analysis.mtls import readiness
from meshlens.analysis.recommend import analyze, recommend, summary
from meshlens.analysis.scope import NoData, Scope, open_scope
from meshlens.analysis.whatif import for_recommendation
from meshlens.analysis.window import Window
from meshlens.collector.stores import Store

__all__ = ["jsonable", "service_map", "service_traffic"]

_EDGE_FIGURES = ("n", "rate_per_s", "errors", "error_rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms")


def service_map(store: Store, window: Window) -> dict[str, Any]:
    """Every caller → callee edge of the window with its figures, and each service seen: its depth, meshed or not.
    Raises analysis' NoData when the window holds no calls."""
    model = analyze(store, window)
    edges = _edges(model.edges)
    meshed = {e["caller"] for e in edges if e["observer"] == "client"}
    names = {e["caller"] for e in edges} | {e["callee"] for e in edges}
    depth = graph.call_levels((e["caller"], e["callee"]) for e in edges)
    callers = {e["caller"] for e in edges}
    services = [{"name": s, "level": depth.get(s, 0), "caller": s in callers, "meshed": s in meshed}
                for s in sorted(names)]
    for e in edges:
        e["caller_meshed"] = e["caller"] in meshed
    return {"window": model.window, "n": model.n, "edges": edges, "services": services}


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
    return [{"caller": str(r["caller"]), "callee": str(r["callee"]), "protocol": str(r["protocol"]),
             "observer": str(r["observer"]),
             **{k: jsonable(r[k]) for k in _EDGE_FIGURES}, "confidence": str(r["confidence"])}
            for r in frame.to_dict(orient="records")]


def _whatif(scope: Scope, rec: Recommendation) -> dict[str, Any] | None:
    """The recommended policy replayed on the calls it is for (the what-if `recommend --apply` stores with it),
    with a sentence saying what it would have done."""
    w = jsonable(for_recommendation(scope, rec))
    p = rec.policy
    if not w:
        return None
    if rec.kind == "timeout":
        return {**w, "says": f"{w['cut']} of {w['n']} calls would have been cut at {p['timeout_s'] * 1000:g} ms, "
                             f"{w['cut_ok']} of them calls that succeeded"}
    if rec.kind == "retry":
        if w["recovered"] is None:  # no failure with calls around it to estimate from
            return w
        return {**w, "says": f"of {w['transient_failures']} transient failures, ~{w['recovered']:.0f} "
                             f"({w['recovered_lo']:.0f} to {w['recovered_hi']:.0f}) would have been recovered, "
                             f"for ~{w['retries_sent']:.0f} retries ({w['extra_load_share']:.2%} more calls)"}
    k = p["consecutive5xxErrors"] or p["consecutiveGatewayErrors"]
    return {**w, "says": f"{w['ejections']} ejection(s) after {k} failures in a row; {w['rejected']} calls would "
                         f"have gone to other instances, {w['rejected_failed']} of them failures on the ejected one"}


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

"""SQL fragments the dashboards share, written for Grafana's ClickHouse datasource.

Every panel reads `calls` through the same few pieces, so the observer rule and
the failure definition are written once. The rule is the one analysis uses
(analysis/window.py, restated in SQL because dashboards import only `collector`
and because a dashboard cannot run Python between queries; the tests check the
constants are equal and that the overview and service detail count exactly what
analysis counts): per caller -> callee edge, only the first observer in the
preference order that saw the edge in the window counts, and the tap's or a
span's copy of a call the callee's own sidecar recorded is dropped, so an
exchange seen by both sidecars, the tap and a span is one call.

Macro placement matters. The plugin's backend (grafana-plugin-sdk-go
sqlutil.Interpolate) looks for a macro's argument list by scanning forward to
the next parenthesis, even past other text, so a macro without arguments
(`$__interval_s`, `$__fromTime`, `$__toTime`) must be followed by `)` before
any `(`: it is always written inside parentheses, e.g. `($__interval_s)`.
"""
from __future__ import annotations

CALLER_SIDE: tuple[str, ...] = ("client", "server", "wire", "otlp")
SERVICE_SIDE: tuple[str, ...] = ("server", "client", "wire", "otlp")

CALLS = "${database}.calls"
TRACES = "${database}.otel_traces"
TRACE_ID_TS = "${database}.otel_traces_trace_id_ts"

# A caller the recorder could not name (no service, or an address standing in for one, as the tap records
# addresses that match nothing in mesh.yaml) is named by its IP alone, so its connections are one caller.
UNNAMED = ("(src_service = '' OR (match(toString(src_service), '^[0-9a-fA-F.:\\\\[\\\\]]+$') "
           "AND match(toString(src_service), '[.:]')))")
CALLER = f"if({UNNAMED}, if(src_addr != '', src_addr, '(unknown)'), toString(src_service))"
# Observers that see a call from outside both sidecars, and so may not know who called.
OUTSIDE_OBSERVERS: tuple[str, ...] = ("wire", "otlp")
CALLEE = "toString(dst_service)"
# A failure as the caller sees it: no response (an error class), a 5xx, or a gRPC server error under HTTP 200
# (analysis.scope.FAILED_SQL).
FAILED = "(error != '' OR status >= 500 OR grpc_status IN (2, 4, 12, 13, 14, 15))"
HEALTHY = "(error = '' AND status < 500 AND grpc_status NOT IN (2, 4, 12, 13, 14, 15))"
ROUTE = "if(route != '', toString(route), path)"
WINDOW = "$__timeFilter(time)"
BUCKET = "$__timeInterval(time)"
PER_SECOND = "($__interval_s)"
MS = "duration_ns / 1e6"


def _array(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{o}'" for o in items) + "]"


def preferred_observer(prefer: tuple[str, ...] = CALLER_SIDE) -> str:
    """SQL: (caller, callee, observer) of each edge's first preferred observer in the window."""
    return (f"SELECT {CALLER} AS c, {CALLEE} AS d, "
            f"argMin(toString(observer), indexOf({_array(prefer)}, toString(observer))) AS o "
            f"FROM {CALLS} WHERE {WINDOW} GROUP BY c, d")


def observer_rule(prefer: tuple[str, ...] = CALLER_SIDE) -> str:
    """SQL condition: only the rows of each edge's first preferred observer, less the copies of calls a
    callee's own sidecar recorded that the tap or a span names differently (analysis.window.observer_filter).

    A callee with a sidecar records every inbound call, unnamed callers included: the tap's or a span's
    copy with an unnamed caller is dropped. And when a caller without a sidecar names itself in its own
    span while the callee's sidecar saw it only by address, the sidecar's copy (the span's child: same
    trace, parent = the span) is dropped and the named span kept.
    """
    chosen = f"({CALLER}, {CALLEE}, toString(observer)) IN ({preferred_observer(prefer)})"
    outside = _array(OUTSIDE_OBSERVERS)[1:-1]
    sidecars = f"SELECT DISTINCT toString(dst_service) FROM {CALLS} WHERE {WINDOW} AND observer = 'server'"
    copies = f"(observer IN ({outside}) AND toString(dst_service) IN ({sidecars}) AND {UNNAMED})"
    spanned = (f"(observer = 'server' AND {UNNAMED} AND parent_span_id != '' AND (trace_id, parent_span_id) IN "
               f"(SELECT trace_id, span_id FROM {CALLS} WHERE {WINDOW} AND observer IN ({outside}) "
               f"AND toString(dst_service) IN ({sidecars}) AND {chosen}))")
    return f"({chosen} AND NOT ({copies} OR {spanned}))"


def one_observer(prefer: tuple[str, ...] = CALLER_SIDE) -> str:
    """SQL condition: the rows the `observer` variable selects.

    `auto` applies the observer rule with `prefer` as the preference order;
    a named observer keeps only its rows (still one observer, so no double count).
    """
    return f"(('${{observer}}' = 'auto' AND {observer_rule(prefer)}) OR toString(observer) = '${{observer}}')"


def services_filter(column: str = "dst_service") -> str:
    """SQL condition on a multi-value `service` variable with an All option."""
    return f"$__conditionalAll({column} IN (${{service:singlequote}}), $service)"


def scope(*conds: str, prefer: tuple[str, ...] = CALLER_SIDE) -> str:
    """WHERE body: the time window, one observer per edge, and any further conditions."""
    return " AND ".join((WINDOW, one_observer(prefer), *conds))


def quantile_ms(q: float) -> str:
    return f"round(quantile({q})(duration_ns) / 1e6, 3)"


def error_ratio() -> str:
    return f"round(countIf({FAILED}) / count(), 4)"

"""Route templating: `/users/8812/orders/5f3c9a1b…` -> `/users/{id}/orders/{id}`, in SQL.

Two steps, both evaluated by ClickHouse:

1. Static: one regular-expression pass replaces numeric, UUID and hex
   (8 or more hex digits) segments with `{id}`.
2. From the data: over the *distinct* statically templated paths of each
   destination service, a segment position (under a given parent prefix) that
   takes HIGH_CARDINALITY_MIN or more distinct values is a parameter
   (`/users/alice`, `/users/bob`, … -> `/users/{id}`). Only the resulting
   rules (a handful of strings) come back to Python and go into the expression.

A non-empty `route` column (filled by an instrumented app) is used as it is, in the
app framework's own template syntax (`/stock/{sku}`, `/users/:id`, …); analysis.uri_match
turns either kind into an Istio uri match. A gRPC call's path is its method path
(`/package.Service/Method`): it names a method, never an id, so it is its route as it
is (a span leaves `route` empty; a service with 20 methods is no collection of ids).

The template is computed in SQL on every run, once: only the shared route
query (analysis.route_stats, or graph.routes for `analyze`) evaluates it; the
other questions never select it, so ClickHouse never computes it for them.
Writing it back into `route` instead (one ALTER TABLE … UPDATE, measured with
bench/analysis.py --write-routes on 10M calls, two runs) cost 2.9-3.4 s per
write and made recommend 7-20% faster (4.85 → 4.55 s, 5.08 → 4.22 s), and
needs write access that the collector's read-only query endpoint does not
give: not done here (a collector-side job could, if that gain is wanted).
Known limit: a high-cardinality segment nested under another one is detected
per parent value, so only the outer one is templated when the inner values are spread thin.
"""
from __future__ import annotations

from meshlens.collector.stores import Store

from meshlens.analysis.window import quote

PARAM = "{id}"

# Distinct values under one parent before a segment counts as a parameter: REST
# collections rarely have 20 fixed sub-resources, while ids exceed it quickly.
HIGH_CARDINALITY_MIN = 20
# Rows route detection reads at most (sampled beyond): ~0.2 s of regex work.
DETECT_ROWS = 1_000_000

_ID_SEGMENT = (r"(?:[0-9]+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
               r"|[0-9a-fA-F]{8,})")


def static_sql(path: str = "path") -> str:
    """SQL: `path` with numeric, UUID and hex segments replaced by {id}.

    One pass; `\\b` ends the segment (re2 has no lookahead), so `/42.json`
    becomes `/{id}.json` while `/42abc` stays. Measured on 10M paths: 1.8 s,
    against 7.7 s for two passes of a pattern that consumes the next slash.
    """
    return f"replaceRegexpAll({path}, {quote('/' + _ID_SEGMENT + chr(92) + 'b')}, {quote('/' + PARAM)})"


def detect_rules(store: Store, where: str, rows: int, minimum: int = HIGH_CARDINALITY_MIN) -> list[str]:
    """High-cardinality segment positions as 'service|position|parent' keys, found in SQL.

    Looks at about DETECT_ROWS of the `rows` calls in scope (a random sample
    when there are more): a segment with hundreds of values still shows
    HIGH_CARDINALITY_MIN of them in the sample.
    """
    every = max(1, -(-rows // DETECT_ROWS))
    sample = f" AND rand() % {every} = 0" if every > 1 else ""
    sql = f"""
SELECT key FROM (
    SELECT concat(svc, '|', toString(pos), '|', arrayStringConcat(arraySlice(segs, 1, pos - 1), '/')) AS key,
           segs[pos] AS seg
    FROM (SELECT DISTINCT toString(dst_service) AS svc, splitByChar('/', {static_sql()}) AS segs
          FROM calls WHERE {where} AND route = '' AND path != '' AND protocol != 'grpc'{sample})
    ARRAY JOIN arrayEnumerate(segs) AS pos
    WHERE seg != '' AND seg != {quote(PARAM)})
GROUP BY key HAVING uniqExact(seg) >= {int(minimum)} ORDER BY key"""
    return [r[0] for r in store.query_rows(sql)]


def route_sql(rules: list[str]) -> str:
    """SQL expression for the templated route of a `calls` row under `rules`."""
    static = static_sql()
    templated = static
    if rules:
        keys = "[" + ", ".join(quote(k) for k in rules) + "]"
        services = "(" + ", ".join(quote(k.split("|", 1)[0]) for k in sorted(set(rules))) + ")"
        segs = f"splitByChar('/', {static})"
        dynamic = (f"arrayStringConcat(arrayMap(i -> if(has({keys}, concat(toString(dst_service), '|', toString(i), "
                   f"'|', arrayStringConcat(arraySlice(_segs, 1, i - 1), '/'))), {quote(PARAM)}, _segs[i]), "
                   f"arrayEnumerate({segs} AS _segs)), '/')")
        templated = f"if(dst_service IN {services}, {dynamic}, {static})"
    return f"multiIf(route != '', toString(route), protocol = 'grpc', path, {templated})"

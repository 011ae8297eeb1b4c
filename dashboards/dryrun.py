"""The dry-run dashboard: what each policy would have done to a service's calls, beside what enforce did, and
how the calls fared in each mode, marked with the control plane's changes to the service.

A call's `action` holds the words of the policies that acted on it, or would have (proxy/chain.py),
comma-separated. They are split in SQL and each distinct word counts the call once, its `:SUBSET`
dropped (`would_route:v2` is `would_route`): a call with two words counts for both, a call retried
twice is one retried call. A word is counted on the row of the observer that ran its policy: the
traffic policies run in the caller's sidecar and write on its row, the inbound ones (authorization,
the rate limit, PeerAuthentication) in the callee's. So the observer rule (one observer per edge)
picks the caller's side first for the caller's words and the callee's side first for the callee's:
one row per exchange either way, and the row that can hold the word.
"""
from __future__ import annotations

from typing import Any

from meshlens.collector.record import MODES
from meshlens.dashboards.annotations import change_annotations
from meshlens.dashboards.mesh import TRACE_LINK, table, ts
from meshlens.dashboards.model import (Panel, Row, clickhouse_datasource_var, dashboard, database_var, override,
                                       query_var)
from meshlens.dashboards.sql import (BUCKET, CALLEE, CALLER, CALLER_SIDE, CALLS, FAILED, MS, PER_SECOND,
                                     SERVICE_SIDE, WINDOW, error_ratio, observer_rule)

# The words the callee's sidecar writes (proxy/policies.py Authorization and RateLimit, proxy/downstream.py's
# PeerAuthentication note); every other word is written by the caller's.
CALLEE_WORDS: tuple[str, ...] = ("would_deny", "denied", "audited", "would_rate_limit", "rate_limited",
                                 "would_refuse_plaintext", "refused_plaintext")
# A call's distinct words, each without its argument (routed:v2 -> routed).
WORDS = "arrayDistinct(arrayMap(w -> splitByChar(':', w)[1], splitByChar(',', toString(action))))"
WOULD = "startsWith(word, 'would_')"
ENFORCED = "(word != '' AND NOT startsWith(word, 'would_'))"
CALLEE_SIDE = f"word IN ({', '.join(repr(w) for w in CALLEE_WORDS)})"
THIS_SERVICE = "dst_service = '${service}'"
EXAMPLES_PER_WORD = 5


def by_its_observer() -> str:
    """SQL condition on a row joined with one of its words: the row is the one its edge counts for that word."""
    return f"if({CALLEE_SIDE}, {observer_rule(SERVICE_SIDE)}, {observer_rule(CALLER_SIDE)})"


def words_sql(which: str) -> str:
    """Calls per second to the service per word (WOULD or ENFORCED), over time."""
    return f"""
SELECT {BUCKET} AS time, word, count() / {PER_SECOND} AS calls_per_s
FROM {CALLS} ARRAY JOIN {WORDS} AS word
WHERE {WINDOW} AND {THIS_SERVICE} AND {which} AND {by_its_observer()}
GROUP BY time, word ORDER BY time"""


def share_sql() -> str:
    """Per would_* word: the calls made in dry-run it would have acted on, of all calls made in dry-run (counted
    on the same side as the word)."""
    dry_run = f"{WINDOW} AND {THIS_SERVICE} AND mode = 'dry-run'"
    return f"""
SELECT w.word AS word, w.calls AS calls, if(w.callee_side, t.callee_n, t.caller_n) AS dry_run_calls,
       round(calls / dry_run_calls, 4) AS share
FROM (SELECT word, {CALLEE_SIDE} AS callee_side, count() AS calls
      FROM {CALLS} ARRAY JOIN {WORDS} AS word
      WHERE {dry_run} AND {WOULD} AND {by_its_observer()}
      GROUP BY word) AS w
CROSS JOIN (SELECT countIf({observer_rule(CALLER_SIDE)}) AS caller_n, countIf({observer_rule(SERVICE_SIDE)})
                AS callee_n
            FROM {CALLS} WHERE {dry_run}) AS t
ORDER BY share DESC, word"""


def dryrun() -> dict[str, Any]:
    to_me = f"{WINDOW} AND {THIS_SERVICE} AND {observer_rule(CALLER_SIDE)}"
    mode = "if(mode = '', '(no sidecar)', toString(mode))"
    mode_order = "[" + ", ".join(f"'{m}'" for m in MODES) + "]"
    items: list[Panel | Row] = [
        Row("${service}: what dry-run would do, what enforce did"),
        ts("Would do, per policy (dry-run)", words_sql(WOULD), unit="reqps",
           description="Calls per second each policy in dry-run would have acted on (would_retry, would_timeout, "
                       "...; would_route:SUBSET as would_route)."),
        ts("Did, per policy (enforce)", words_sql(ENFORCED), unit="reqps",
           description="Calls per second each enforced policy acted on (retried, timed_out, denied, routed, ...)."),
        table("Share of dry-run calls each policy would touch", share_sql(), w=10,
              description="Of the calls made while the service was in dry-run, how many each policy would have "
                          "acted on.",
              overrides=[override("share", unit="percentunit",
                                  custom_cellOptions={"type": "gauge", "mode": "basic"})]),
        table("Calls per mode", f"""
SELECT {mode} AS mode, count() AS calls, countIf({FAILED}) AS failed, {error_ratio()} AS error_ratio,
       round(quantileExact(0.5)(duration_ns) / 1e6, 3) AS p50_ms, round(quantileExact(0.99)(duration_ns) / 1e6, 3)
           AS p99_ms
FROM {CALLS} WHERE {to_me}
GROUP BY mode ORDER BY indexOf({mode_order}, mode)""", w=14,
              description="The calls as their callers got them, in each mode the service was in "
                          "(exact quantiles, as analysis compares modes).",
              overrides=[override("error_ratio", unit="percentunit"), override("p50_ms", unit="ms"),
                         override("p99_ms", unit="ms")]),
        ts("Failure ratio by mode", f"""
SELECT {BUCKET} AS time, {mode} AS mode, countIf({FAILED}) / count() AS failure_ratio
FROM {CALLS} WHERE {to_me}
GROUP BY time, mode ORDER BY time""", unit="percentunit"),
        ts("p99 latency by mode", f"""
SELECT {BUCKET} AS time, {mode} AS mode, quantile(0.99)({MS}) AS p99_ms
FROM {CALLS} WHERE {to_me}
GROUP BY time, mode ORDER BY time""", unit="ms"),
        Row("Example calls"),
        table(f"Example calls per would_* word (latest {EXAMPLES_PER_WORD})", f"""
SELECT word, time, {CALLER} AS caller, toString(observer) AS observer, toString(method) AS method, path, status,
       toString(error) AS error, round(duration_ns / 1e6, 3) AS duration_ms, toString(action) AS action, trace_id
FROM {CALLS} ARRAY JOIN {WORDS} AS word
WHERE {WINDOW} AND {THIS_SERVICE} AND {WOULD} AND {by_its_observer()}
ORDER BY word, time DESC LIMIT {EXAMPLES_PER_WORD} BY word""", w=24, h=10,
              overrides=[override("duration_ms", unit="ms"), override("trace_id", links=TRACE_LINK)]),
    ]
    svc = query_var("service", "Service", f"SELECT DISTINCT {CALLEE} AS service FROM {CALLS} "
                                          f"WHERE {WINDOW} AND mode IN ('dry-run', 'enforce') ORDER BY service")
    return dashboard("meshlens-dryrun", "meshlens / Dry-run",
                     "One service's policies: what each would do in dry-run, what enforced ones did, the share of "
                     "calls each would touch, error rate and p99 in each mode, example calls; mode switches, "
                     "policy changes and automatic rollbacks marked.",
                     [clickhouse_datasource_var(), database_var(), svc], items,
                     annotations=change_annotations("'${service}'"))

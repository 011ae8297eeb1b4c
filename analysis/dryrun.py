"""The dry-run report of one service: what each policy would have done, what that would have changed for its
callers, against what was expected of it and what observe measured before.

In dry-run every policy decides on every call and only writes its word (`would_timeout`, `would_retry`,
...; proxy/chain.py): the calls themselves went as in observe. Each word is read where it is written:
traffic policies' on the caller's sidecar's rows, inbound ones' (INBOUND) on the service's own. So the report reads, per word, how many
calls carry it and a few of them, and estimates the calls as the caller would have had them enforced:

- `would_timeout`, `would_reject_overflow`, `would_refuse_plaintext`, `would_no_route`: the call fails
  (504, 503, a closed connection, 404); a timed-out call lasts the timeout;
- `would_retry` on a failed call: recovered with the probability the recommendation measured
  (P(success on retry), over its attempts), else this window's own share of successful calls;
- `would_eject` on a failed call not retried: sent to another instance, failing as the others do;
- `would_deny`, `would_rate_limit`: answered 403 / 429 (counted apart: refusals, not failures).

Next to it: the what-if stored with each recommended policy (`recommend --apply`, analysis.proposal),
the observe figures (this window's, else those stored at apply time) and, when the service has been
enforced in the window, what enforce measured. Where the dry-run and the expectation disagree beyond
chance, a finding says so in words.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshlens.analysis.evidence import wilson
from meshlens.analysis.mode_figures import Figures, by_mode
from meshlens.analysis.proposal import evidence_of, observed_of
from meshlens.analysis.scope import FAILED_SQL, HEALTHY_SQL, NoData, Scope, open_scope
from meshlens.analysis.window import SERVICE_SIDE, Window, quote
from meshlens.collector.stores import Store

__all__ = ["DryRunReport", "dryrun_report"]

EXAMPLES = 3
# Words whose call the caller would have seen fail, enforced (written by the caller's sidecar).
FAILS = ("would_timeout", "would_reject_overflow", "would_no_route")
REFUSES = {"would_deny": 403, "would_rate_limit": 429}
# Words the called service's own sidecar writes (its inbound policies): read on its rows, the caller's
# sidecar never sees them.
INBOUND = ("would_deny", "would_rate_limit", "would_refuse_plaintext")


@dataclass(frozen=True)
class Policy:
    """One dry-run word over the window: its calls, a few examples, and what was expected of it."""

    word: str
    n: int
    failed: int
    share: float
    examples: list[dict[str, Any]]
    expected: dict[str, Any] = field(default_factory=dict)


@dataclass
class DryRunReport:
    service: str
    window: str
    dry_run: Figures
    estimated: Figures
    """The dry-run's calls as they would have been enforced (see the module's docstring)."""
    refused: dict[str, int]
    policies: list[Policy]
    observe: dict[str, Any] | None
    enforce: Figures | None
    findings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "window": self.window, "dry_run": self.dry_run.as_dict(),
                "estimated_enforce": self.estimated.as_dict(), "refused": self.refused,
                "observe": self.observe, "enforce": self.enforce.as_dict() if self.enforce else None,
                "policies": [vars(p) for p in self.policies], "findings": self.findings}

    def text(self) -> str:
        out = [f"dry-run report for {self.service}, {self.window}"]
        if self.observe:
            o = self.observe
            out.append(f"  observe (before)     {o['error_rate']:.2%} failed (n={o['n']:,}), p50 "
                       f"{o['p50_s'] * 1000:.1f} ms, p99 {o['p99_s'] * 1000:.1f} ms"
                       + (f"   [{o['window']}]" if o.get("window") else ""))
        out.append(f"  dry-run (as it went) {self.dry_run.text()}")
        out.append(f"  enforced, estimated  {self.estimated.text()}"
                   + "".join(f", {n:,} answered {REFUSES[w]}" for w, n in self.refused.items() if n))
        if self.enforce:
            out.append(f"  enforce (measured)   {self.enforce.text()}")
        out.append("")
        out.append("  policy                    calls    share  of them failed  expected (recommendation's what-if)")
        for p in self.policies:
            out.append(f"  {p.word:24} {p.n:>6,}  {p.share:>6.2%}  {p.failed:>14,}  {_expected_text(p)}")
        if not self.policies:
            out.append("  (no policy would have acted on any call)")
        for p in self.policies:
            for e in p.examples:
                grpc = f" grpc-status {e['grpc_status']}" if e["grpc_status"] >= 0 else ""
                out.append(f"    e.g. {p.word}: {e['time']} {e['caller']} {e['method']} {e['path']} -> "
                           f"{e['status']}{grpc} in {e['duration_ms']:.1f} ms ({e['instance']})")
        out.append("")
        out += [f"  * {f}" for f in self.findings]
        return "\n".join(out) + "\n"


def _expected_text(p: Policy) -> str:
    e = p.expected
    if not e:
        return "-"
    if "cut_share" in e:
        return f"{e['cut_share']:.2%} of calls cut, {e['cut_ok']} of them successful"
    if "transient_failures" in e:
        return f"{e['transient_share']:.2%} transient failures, ~{e['recovered_share']:.0%} of them recovered"
    if "ejections" in e:
        ejected = [i["instance"] for i in e.get("instances") or () if i["trips"]]
        return f"{e['ejections']} ejection(s) of {', '.join(ejected) or 'none'}"
    return "-"


def _calls(scope: Scope, word: str) -> str:
    """The calls a word is counted on: the service's own sidecar's rows for its inbound words, else the
    caller's (one observer per edge either way)."""
    return scope.calls(SERVICE_SIDE) if word in INBOUND else scope.calls()


def _words_sql(scope: Scope, service: str) -> str:
    inbound = "[" + ", ".join(quote(w) for w in INBOUND) + "]"

    def side(calls: str, keep: str) -> str:
        return f"""SELECT word, count() AS n, countIf({FAILED_SQL}) AS failed FROM (
  SELECT *, arrayJoin(arrayDistinct(arrayMap(w -> splitByChar(':', w)[1], splitByChar(',', toString(action)))))
         AS word FROM {calls} WHERE dst_service = {quote(service)} AND mode = 'dry-run' AND action != '')
WHERE startsWith(word, 'would_') AND {keep} GROUP BY word"""
    return (f"SELECT * FROM ({side(scope.calls(), f'NOT has({inbound}, word)')} UNION ALL "
            f"{side(scope.calls(SERVICE_SIDE), f'has({inbound}, word)')}) ORDER BY n DESC, word")


def _has(word: str) -> str:
    return f"has(arrayMap(w -> splitByChar(':', w)[1], splitByChar(',', toString(action))), {quote(word)})"


def dryrun_report(store: Store, window: Window, service: str, stored: list[dict[str, Any]] | None = None,
                  scope: Scope | None = None) -> DryRunReport:
    """`stored`: the service's policy documents in the control plane (their evidence, their timeouts); none:
    no expectation to compare with. Raises NoData when the window holds no call to `service` in dry-run
    (UnknownService when none at all)."""
    scope = scope or open_scope(store, window, service)
    figures = by_mode(scope, service)
    dry = figures.get("dry-run")
    if dry is None:
        raise NoData(f"no calls to {service} in dry-run in {scope.label()}: put it in dry-run "
                     f"(meshlens recommend --service {service} --apply) and let calls flow")
    stored = stored or []
    expected = _expected(stored)
    words = scope.store.query_rows(_words_sql(scope, service))
    examples = _examples(scope, service, [w for w, *_ in words])
    policies = [Policy(w, int(n), int(f), int(n) / dry.n, examples.get(w, []), expected.get(w, {}))
                for w, n, f in words]
    estimated, refused = _estimate(scope, service, dry, expected, _timeout_s(stored))
    observe = figures["observe"].as_dict() | {"window": scope.label()} if "observe" in figures else observed_of(stored)
    report = DryRunReport(service, scope.label(), dry, estimated, refused, policies, observe,
                          figures.get("enforce"), [])
    report.findings = _findings(report)
    return report


def _examples(scope: Scope, service: str, words: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for word in words:
        rows = scope.store.query_rows(f"""SELECT toString(toDateTime64(time, 3)), caller, toString(method), path, status,
       grpc_status, duration_ns / 1e6, instance FROM {_calls(scope, word)}
WHERE dst_service = {quote(service)} AND mode = 'dry-run' AND {_has(word)} ORDER BY time DESC LIMIT {EXAMPLES}""")
        out[word] = [{"time": t, "caller": c, "method": m, "path": p, "status": int(s), "grpc_status": int(g),
                      "duration_ms": float(d), "instance": i} for t, c, m, p, s, g, d, i in rows]
    return out


def _expected(stored: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dry-run word, the what-if of the recommendations stored with the policies (summed over routes)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in stored:
        for e in evidence_of(doc):
            w = e.get("whatif") or {}
            if e["kind"] == "timeout" and "cut" in w:
                t = out.setdefault("would_timeout", {"n": 0, "cut": 0, "cut_ok": 0})
                t.update(n=t["n"] + w["n"], cut=t["cut"] + w["cut"], cut_ok=t["cut_ok"] + w["cut_ok"])
                t["cut_share"] = t["cut"] / t["n"] if t["n"] else 0.0
            elif e["kind"] == "retry" and "transient_failures" in w:
                r = out.setdefault("would_retry", {"n": 0, "transient_failures": 0, "recovered": 0.0,
                                                   "attempts": e["policy"]["attempts"]})
                r.update(n=r["n"] + w["n"], transient_failures=r["transient_failures"] + w["transient_failures"],
                         recovered=r["recovered"] + w["recovered"])
                r["transient_share"] = r["transient_failures"] / r["n"] if r["n"] else 0.0
                r["recovered_share"] = r["recovered"] / r["transient_failures"] if r["transient_failures"] else 0.0
            elif e["kind"] == "outlier" and "ejections" in w:
                out["would_eject"] = dict(w)
    return out


def _timeout_s(stored: list[dict[str, Any]]) -> float | None:
    """The route timeout a timed-out call would have lasted: the VirtualService's, the shortest when several."""
    from meshlens.policy.spec import duration_s

    found = [duration_s(h["timeout"]) for d in stored if d.get("kind") == "VirtualService"
             for h in d["spec"].get("http") or () if h.get("timeout")]
    return min(found) if found else None


def _estimate(scope: Scope, service: str, dry: Figures, expected: dict[str, dict[str, Any]],
              timeout_s: float | None) -> tuple[Figures, dict[str, int]]:
    fails = " OR ".join(_has(w) for w in FAILS)
    cap = f"least(duration_ns, {int(timeout_s * 1e9)})" if timeout_s else "duration_ns"
    sql = f"""SELECT countIf(({fails}) AND {HEALTHY_SQL}) AS newly_failed,
       countIf({_has('would_retry')} AND {FAILED_SQL} AND NOT ({fails})) AS retried_failed,
       countIf({_has('would_eject')} AND {FAILED_SQL} AND NOT {_has('would_retry')} AND NOT ({fails})) AS ejected_failed,
       countIf(NOT {_has('would_eject')}) AS kept, countIf(NOT {_has('would_eject')} AND {FAILED_SQL}) AS kept_failed,
       quantileExact(0.5)(if({_has('would_timeout')}, {cap}, duration_ns)) AS p50,
       quantileExact(0.99)(if({_has('would_timeout')}, {cap}, duration_ns)) AS p99
FROM {scope.calls()} WHERE dst_service = {quote(service)} AND mode = 'dry-run'"""
    newly, retried, ejected, kept, kept_failed, p50, p99 = scope.store.query_rows(sql)[0]
    plaintext, deny, limit = scope.store.query_rows(f"""SELECT countIf({_has('would_refuse_plaintext')} AND {HEALTHY_SQL}),
       {", ".join(f"countIf({_has(w)})" for w in REFUSES)}
FROM {scope.calls(SERVICE_SIDE)} WHERE dst_service = {quote(service)} AND mode = 'dry-run'""")[0]
    newly = int(newly) + int(plaintext)  # a plaintext connection STRICT closes: the call fails
    retry = expected.get("would_retry")
    if retry and retry["transient_failures"]:
        p_recover = retry["recovered_share"]
    else:  # no measurement stored: a retry succeeds as often as calls do here
        p_recover = 1.0 - dry.error_rate
    other_fail = int(kept_failed) / int(kept) if int(kept) else dry.error_rate
    failed = dry.failed + int(newly) - round(int(retried) * p_recover) - round(int(ejected) * (1 - other_fail))
    est = Figures("enforce (estimated)", dry.n, max(failed, 0), int(p50) / 1e9, int(p99) / 1e9)
    return est, {"would_deny": int(deny), "would_rate_limit": int(limit)}


def _findings(r: DryRunReport) -> list[str]:
    """Sentences: what enforcing would change for callers, and where the dry-run and the expectation part."""
    out = []
    d, e = r.dry_run, r.estimated
    if e.failed < d.failed:
        out.append(f"enforced, callers would see fewer failures: {e.error_rate:.2%} instead of {d.error_rate:.2%} "
                   f"({d.failed - e.failed:,} of {d.n:,} calls recovered)")
    elif e.failed > d.failed:
        out.append(f"enforced, callers would see MORE failures: {e.error_rate:.2%} instead of {d.error_rate:.2%} "
                   f"({e.failed - d.failed:,} more of {d.n:,} calls would fail)")
    if e.p99_s < d.p99_s * 0.9:
        out.append(f"p99 would fall from {d.p99_s * 1000:.1f} ms to {e.p99_s * 1000:.1f} ms (timed-out calls end at "
                   f"the timeout)")
    for p in r.policies:
        out += _disagreement(p, d.n)
    if r.observe and d.n >= 100 and r.observe.get("n", 0) >= 100:
        o_lo, o_hi = wilson(int(r.observe["failed"]), int(r.observe["n"]))
        lo, hi = d.error_interval()
        if lo > o_hi or hi < o_lo:
            out.append(f"the traffic itself changed: {d.error_rate:.2%} of calls fail in dry-run against "
                       f"{r.observe['error_rate']:.2%} in observe before, beyond chance; estimates from the "
                       f"recommendation's window may not hold")
    if not r.policies:
        out.append("no policy would have acted on any call: enforcing would change nothing callers see")
    return out


def _disagreement(p: Policy, n: int) -> list[str]:
    e = p.expected
    lo, hi = wilson(p.n, n)
    if p.word == "would_timeout" and "cut_share" in e:
        if lo > e["cut_share"] and p.n - p.failed > e["cut_ok"]:
            return [f"DISAGREES: the recommendation expected {e['cut_share']:.2%} of calls cut by the timeout "
                    f"({e['cut_ok']} successful), dry-run says {p.share:.2%} ({p.n - p.failed:,} of them succeeded): "
                    f"calls are slower than when it was measured, or the timeout is too tight; enforcing it would "
                    f"fail calls that now succeed"]
        return [f"would_timeout agrees with the recommendation: {p.share:.2%} of calls against "
                f"{e['cut_share']:.2%} expected"]
    if p.word == "would_retry" and "transient_share" in e:
        if hi < e["transient_share"] / 2 or lo > e["transient_share"] * 2:
            return [f"DISAGREES: the recommendation expected {e['transient_share']:.2%} transient failures to retry, "
                    f"dry-run would have retried {p.share:.2%} of calls: the failures are not what they were"]
        return [f"would_retry agrees with the recommendation: {p.share:.2%} of calls against "
                f"{e['transient_share']:.2%} expected"]
    if p.word == "would_eject" and "ejections" in e and not e["ejections"]:
        return ["DISAGREES: the recommendation expected no ejection; dry-run would have ejected"]
    return []


def services_in_dry_run(scope: Scope) -> list[tuple[str, int, int]]:
    """Services with calls in dry-run in the window: (service, calls, calls a policy would have acted on), those
    with the most such calls first (a service in dry-run with no policy has nothing to report)."""
    rows = scope.store.query_rows(f"""SELECT toString(dst_service) AS s, count() AS n,
       countIf(position(toString(action), 'would_') > 0) AS acted FROM {scope.calls()}
WHERE mode = 'dry-run' GROUP BY s ORDER BY acted DESC, n DESC, s""")
    return [(s, int(n), int(acted)) for s, n, acted in rows]


def words_over_time(scope: Scope, service: str, bucket_s: int = 10) -> Any:
    """Per `bucket_s` and dry-run word: the calls to `service` carrying it (a DataFrame: t, word, n), beside
    the calls per bucket in each mode (word = 'calls in MODE')."""
    words = f"""SELECT toStartOfInterval(time, INTERVAL {int(bucket_s)} SECOND) AS t, word, count() AS n FROM (
  SELECT *, arrayJoin(arrayDistinct(arrayMap(w -> splitByChar(':', w)[1], splitByChar(',', toString(action)))))
         AS word FROM {scope.calls()} WHERE dst_service = {quote(service)} AND action != '')
GROUP BY t, word
UNION ALL
SELECT toStartOfInterval(time, INTERVAL {int(bucket_s)} SECOND) AS t, concat('calls in ', toString(mode)) AS word,
       count() AS n FROM {scope.calls()} WHERE dst_service = {quote(service)} GROUP BY t, word
ORDER BY t, word"""
    return scope.frame(words)

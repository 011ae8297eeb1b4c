"""The recommendations the demo ends with: the ones about the shop's named services, faults first.

`meshlens recommend` prints every row; on one machine many of them concern
callers the mesh cannot name (every connection comes from 127.0.0.1, and the
tap names an unknown client by address and ephemeral port), so the demo shows
the rows whose caller and callee are services it knows, and says how many it
left out and where to see them.
"""
from __future__ import annotations

from typing import Iterable, TextIO

from meshlens.analysis.evidence import Recommendation
from meshlens.analysis.recommend import Report, summary
from meshlens.cli.query_cmd import format_table

KIND_ORDER = ("timeout", "retry", "outlier", "mtls")
MINUTE_AT_DEFAULT_RATE = "60 s"
COLUMNS = ["kind", "caller", "callee", "method", "route", "recommendation", "confidence", "n", "reason"]


def _named(r: Recommendation, known: set[str]) -> bool:
    caller, callee = r.target.get("caller"), r.target.get("callee", "")
    return callee in known and (caller is None or caller in known)


def _telling(r: Recommendation) -> bool:
    """A policy, or a refusal that explains a failure (persistent, or unsafe to retry) — not 'not enough data'."""
    if r.kind not in KIND_ORDER:
        return False
    if r.policy is not None:
        return r.kind != "mtls" or bool(r.evidence.figures.get("blockers"))
    figures = r.evidence.figures
    return r.kind == "retry" and bool(figures.get("retries_off")) and int(figures.get("transient", 0)) > 0


def _mtls_text(r: Recommendation, known: set[str]) -> tuple[str, str]:
    """(recommendation, reason) naming the blockers the mesh knows and counting the rest."""
    blockers = list(r.evidence.figures.get("blockers", []))
    named = [b for b in blockers if b in known]
    unnamed = len(blockers) - len(named)
    rest = f" (and {unnamed} caller(s) known only by address)" if unnamed else ""
    return (f"blocked by {', '.join(named)}{rest} -> {r.policy['mode'] if r.policy else 'PERMISSIVE'}",
            f"{', '.join(named)} call(s) without a sidecar; STRICT would refuse their plaintext calls")


def _named_blocker(r: Recommendation, known: set[str]) -> bool:
    return r.kind != "mtls" or any(b in known for b in r.evidence.figures.get("blockers", []))


def shown(report: Report, known: set[str]) -> list[Recommendation]:
    rows = [r for r in report.recommendations if _named(r, known) and _telling(r) and _named_blocker(r, known)]
    return sorted(rows, key=lambda r: KIND_ORDER.index(r.kind))


def _named_instances(text: str, instances: dict[str, str]) -> str:
    """`127.0.0.1:47535` -> `inventory-3 (127.0.0.1:47535)`: analysis knows instances by address only."""
    for addr, name in instances.items():
        text = text.replace(addr, f"{name} ({addr})")
    return text


def rows(recs: Iterable[Recommendation], known: set[str], instances: dict[str, str] | None = None) -> list[tuple]:
    """Table rows; `instances` maps an instance's address (host:port) to its name in the shop."""
    out = []
    for r in recs:
        text, reason = _mtls_text(r, known) if r.kind == "mtls" else (summary(r), r.evidence.reason)
        if r.kind == "outlier" and instances:
            text, reason = _named_instances(text, instances), _named_instances(reason, instances)
        t = r.target
        out.append((r.kind, t.get("caller", ""), t.get("callee", ""), t.get("method", ""), t.get("route", ""),
                    text, r.evidence.confidence, r.evidence.n, reason))
    return out


def write(report: Report, known: set[str], store_url: str, out: TextIO,
          instances: dict[str, str] | None = None) -> None:
    recs = shown(report, known)
    out.write(f"recommendations for the shop ({report.window}, {report.n:,} calls)\n")
    if recs:
        out.write(format_table(COLUMNS, rows(recs, known, instances)))
    else:
        out.write(f"none yet: too few calls for the analysis' minimums (about {MINUTE_AT_DEFAULT_RATE} of load at "
                  "the default rate makes every fault show)\n")
    left = len(report.recommendations) - len(recs)
    out.write(f"{left} more rows (not enough data, connection pools, callers known only by address): "
              f"meshlens recommend --store {store_url}\n")

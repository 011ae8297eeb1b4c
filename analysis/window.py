"""The time window of a question and the one rule for choosing an observer per edge.

Observer rule (DESIGN.md, "one call"): every question is answered from ONE
observer per caller→callee edge, so an exchange seen by several observers is
counted once. For each edge the first observer in the question's preference
order that has rows for that edge in the window is used, and only its rows:

- CALLER_SIDE (timeouts, retries, outliers, the service graph): client, then
  server, then wire, then otlp — latency and failures as the caller feels them;
- SERVICE_SIDE (service latency): server, then client, then wire, then otlp.

mTLS readiness is the one question that looks at every observer, because
*which* observers saw a caller is what tells a meshed caller from an unmeshed one.

Callers that the recorder could not name (UNNAMED_SQL: the tap on loopback or
behind NAT sees only addresses, a server span may carry no peer service) are
named by IP, and their tap/span rows are dropped for callees whose own sidecar
saw the same calls (observer_filter): otherwise each would be a second edge.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

CALLER_SIDE: tuple[str, ...] = ("client", "server", "wire", "otlp")
SERVICE_SIDE: tuple[str, ...] = ("server", "client", "wire", "otlp")

# A caller the recorder could not name: no service, or its address standing in for the name (the tap
# records an address that matches nothing in mesh.yaml as it is, "10.1.2.3:41234", usually with an
# ephemeral port). Such a caller is named by its IP address alone, so that its connections are one caller.
UNNAMED_SQL = ("(src_service = '' OR (match(toString(src_service), '^[0-9a-fA-F.:\\\\[\\\\]]+$') "
               "AND match(toString(src_service), '[.:]')))")
CALLER_SQL = f"if({UNNAMED_SQL}, if(src_addr != '', src_addr, '(unknown)'), toString(src_service))"
# Observers that see a call from outside both sidecars (and so may not know who called).
OUTSIDE_OBSERVERS = ("wire", "otlp")
INSTANCE_SQL = "concat(dst_addr, ':', toString(dst_port))"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '1h', '7d' (or several: '1h30m') -> timedelta; ValueError otherwise."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 1h, 7d")
    return timedelta(seconds=sum(float(a) * _UNITS[u] for a, u in parts))


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (UTC when no zone is given) or a duration ago ('2h' = two hours ago)."""
    try:
        return datetime.now(timezone.utc) - parse_duration(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use ISO 8601 (2026-11-25T18:00:00) or a duration ago (2h)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class Window:
    """[since, until) in UTC; an open end means "all recorded data" on that side."""

    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def last(cls, span: timedelta, now: datetime | None = None) -> Window:
        end = now or datetime.now(timezone.utc)
        return cls(end - span, end)

    def where(self) -> str:
        """SQL condition on `time` for this window."""
        conds = []
        if self.since is not None:
            conds.append(f"time >= {_ts(self.since)}")
        if self.until is not None:
            conds.append(f"time < {_ts(self.until)}")
        return " AND ".join(conds) or "1"

    def describe(self) -> str:
        a = self.since.strftime("%Y-%m-%dT%H:%M:%SZ") if self.since else "start"
        b = self.until.strftime("%Y-%m-%dT%H:%M:%SZ") if self.until else "now"
        return f"{a}..{b}"


def _ts(t: datetime) -> str:
    t = t.astimezone(timezone.utc)
    return f"toDateTime64('{t.strftime('%Y-%m-%d %H:%M:%S.%f')}', 9, 'UTC')"


def quote(s: str) -> str:
    """A ClickHouse string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


EdgeObservers = dict[tuple[str, str], frozenset[str]]


def edge_observers_sql(where: str) -> str:
    """SQL: which observers saw each caller → callee edge (one small row per edge)."""
    return (f"SELECT {CALLER_SQL} AS c, toString(dst_service) AS d, groupUniqArray(toString(observer)) "
            f"FROM calls WHERE {where} GROUP BY c, d")


def observer_filter(edges: EdgeObservers, prefer: tuple[str, ...] = CALLER_SIDE, where: str = "1") -> str:
    """SQL condition keeping, for each caller → callee edge, only its first preferred observer's rows.

    Written as literal sets, because a literal `observer = 'client'` costs
    nothing where an IN-subquery over every row cost 2-3 s on 10M calls:
    rows of the first preferred observer always qualify; rows of a later
    observer only for the edges that the earlier ones never saw. `where` is
    the window, for the one subquery (pairing spans with sidecar copies).
    """
    chosen: dict[str, list[tuple[str, str]]] = {}
    for edge, seen in sorted(edges.items()):
        first = next((o for o in prefer if o in seen), None)
        if first is not None:
            chosen.setdefault(first, []).append(edge)
    conds = [f"observer = {quote(prefer[0])}"]
    for obs in prefer[1:]:
        if chosen.get(obs):
            pairs = ", ".join(f"({quote(c)}, {quote(d)})" for c, d in chosen[obs])
            conds.append(f"(observer = {quote(obs)} AND ({CALLER_SQL}, toString(dst_service)) IN ({pairs}))")
    keep = "(" + " OR ".join(conds) + ")"
    # A callee with its own (server-side) sidecar records every inbound call, unnamed callers included;
    # the tap's or a span's copy of such a call names its caller differently (by address), so the edge
    # rule above cannot pair them: they are dropped here instead, or the call would count twice.
    sidecars = sorted({d for (_, d), seen in edges.items() if "server" in seen})
    if not sidecars:
        return keep
    outside = ", ".join(quote(o) for o in OUTSIDE_OBSERVERS)
    callees = ", ".join(quote(d) for d in sidecars)
    drop = [f"(observer IN ({outside}) AND toString(dst_service) IN ({callees}) AND {UNNAMED_SQL})"]
    # The other way round: a caller without a sidecar that names itself in its own spans, while the
    # callee's sidecar saw it only by address. The sidecar's copy is the span's child (same trace,
    # parent = the span): the named span is kept, its unnamed copy dropped.
    spanned = [(c, d) for o in OUTSIDE_OBSERVERS for c, d in chosen.get(o, []) if d in sidecars]
    if spanned:
        pairs = ", ".join(f"({quote(c)}, {quote(d)})" for c, d in spanned)
        drop.append(f"(observer = 'server' AND {UNNAMED_SQL} AND parent_span_id != '' AND "
                    f"(trace_id, parent_span_id) IN (SELECT trace_id, span_id FROM calls WHERE {where} AND "
                    f"observer IN ({outside}) AND ({CALLER_SQL}, toString(dst_service)) IN ({pairs})))")
    return f"({keep} AND NOT ({' OR '.join(drop)}))"

"""What the store says of the demo's phases, by their time windows: the shoppers' failures and p99 before and
after, what enforce did on cart's calls to inventory, and the identities on payment's calls.

Every figure the demo prints after a phase comes from a query here, never from the faults it
injected: the tests run the same queries and compare.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from meshlens.analysis.scope import FAILED_SQL
from meshlens.analysis.window import Window
from meshlens.demo import topology
from meshlens.demo.progress import query

__all__ = ["Calls", "Inventory", "Span", "before_after", "identities", "inventory", "shoppers"]


@dataclass(frozen=True)
class Span:
    """A phase's window in whole seconds (so that what is printed is what was queried)."""

    since: int
    until: int

    @classmethod
    def of(cls, start: float, end: float) -> Span:
        """The whole seconds within [start, end]."""
        return cls(math.ceil(start), max(math.ceil(start), math.floor(end)))

    @classmethod
    def around(cls, start: float, end: float) -> Span:
        """The whole seconds covering [start, end]."""
        return cls(math.floor(start), math.ceil(end))

    def window(self) -> Window:
        utc = dt.timezone.utc
        return Window(dt.datetime.fromtimestamp(self.since, utc), dt.datetime.fromtimestamp(self.until, utc))

    def where(self) -> str:
        return self.window().where()

    def text(self) -> str:
        return f"{_iso(self.since)}..{_iso(self.until)}"


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Calls:
    """Calls of one edge in one window: how many, how many failed, their p99."""

    n: int
    failed: int
    p99_s: float

    @property
    def failed_share(self) -> float:
        return self.failed / self.n if self.n else 0.0


# The shoppers' requests as the ingress sidecar saw them: what the users got.
SHOPPERS_SQL = (f"observer = 'client' AND src_service = '{topology.INGRESS}' AND dst_service = 'frontend'")


def shoppers(url: str, span: Span) -> Calls:
    [line] = query(url, f"SELECT count(), countIf({FAILED_SQL}), quantileExact(0.99)(duration_ns) FROM calls "
                        f"WHERE {SHOPPERS_SQL} AND {span.where()} FORMAT TSV").splitlines()
    n, failed, p99 = line.split("\t")
    return Calls(int(n), int(failed), int(p99) / 1e9)


def before_after(before: Calls, after: Calls, names: tuple[str, str]) -> str:
    """`failed 3.1% -> 0.4%, p99 1,480 ms -> 1,210 ms (observe -> enforce, ...)`."""
    return (f"failed {before.failed_share:.1%} -> {after.failed_share:.1%}, "
            f"p99 {before.p99_s * 1000:,.0f} ms -> {after.p99_s * 1000:,.0f} ms "
            f"({names[0]} -> {names[1]}: {before.n:,} -> {after.n:,} requests as the {topology.INGRESS} sidecar saw "
            f"them)")


@dataclass(frozen=True)
class Inventory:
    """Cart's calls to inventory in one phase: failures, the retried ones, the ejections, inventory-3's share.
    In dry-run the words are the would_ ones (what enforce would have done)."""

    n: int
    failed: int
    retried: int
    ejections: int
    flaky_share: float


def _has(word: str) -> str:
    return f"has(splitByChar(',', toString(action)), '{word}')"


def inventory(url: str) -> dict[str, Inventory]:
    """By mode, so far (a retried call names the instance of its last attempt)."""
    retried, ejected = f"({_has('retried')} OR {_has('would_retry')})", f"({_has('ejected')} OR {_has('would_eject')})"
    sql = (f"SELECT toString(mode), count(), countIf({FAILED_SQL}), countIf({retried}), countIf({ejected}), "
           f"countIf(dst_subset = '{topology.FLAKY_INVENTORY}') FROM calls WHERE observer = 'client' "
           f"AND src_service = 'cart' AND dst_service = 'inventory' GROUP BY 1 FORMAT TSV")
    out = {}
    for line in query(url, sql).splitlines():
        mode, *values = line.split("\t")
        n, failed, retried_n, ejected_n, flaky = (int(v) for v in values)
        out[mode] = Inventory(n, failed, retried_n, ejected_n, flaky / n if n else 0.0)
    return out


INVENTORY_COLUMNS = ["cart -> inventory, by mode", "calls", "failed", "retried", "ejections",
                     f"to {topology.FLAKY_INVENTORY}"]


def inventory_row(mode: str, inv: Inventory) -> tuple:
    would = " (would)" if mode == "dry-run" else ""
    return (mode, f"{inv.n:,}", f"{inv.failed / inv.n if inv.n else 0:.1%}", f"{inv.retried:,}{would}",
            f"{inv.ejections:,}{would}", f"{inv.flaky_share:.0%}")


def identities(url: str, span: Span, service: str) -> list[tuple[str, bool, str, int]]:
    """(peer identity, tls, error, calls) of the calls to `service` as its own sidecar saw them."""
    sql = (f"SELECT peer_identity, tls, error, count() FROM calls WHERE observer = 'server' "
           f"AND dst_service = '{service}' AND {span.where()} GROUP BY ALL ORDER BY 4 DESC FORMAT TSV")
    out = []
    for line in query(url, sql).splitlines():
        peer, tls, error, n = line.split("\t")
        out.append((peer, tls in ("1", "true"), error, int(n)))
    return out

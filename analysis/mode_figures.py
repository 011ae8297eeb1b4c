"""A service's calls as its callers see them, per mode: the figures a dry-run report compares and a guard
judges.

One observer per caller → callee edge, the caller's first (analysis.window CALLER_SIDE): a retried
exchange is one row with its final result, so a failure here is a failure the caller got. Quantiles
are exact (`quantileExact`): a guard compares two of them, and a digest's error could exceed the
difference it is looking for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from meshlens.analysis.evidence import wilson
from meshlens.analysis.scope import FAILED_SQL, Scope
from meshlens.analysis.window import quote

__all__ = ["Figures", "by_mode"]


@dataclass(frozen=True, slots=True)
class Figures:
    """Calls to one service in one mode: how many, how many failed, and their latency."""

    mode: str
    n: int
    failed: int
    p50_s: float
    p99_s: float

    @property
    def error_rate(self) -> float:
        return self.failed / self.n if self.n else 0.0

    def error_interval(self) -> tuple[float, float]:
        """95% Wilson interval on the error rate."""
        return wilson(self.failed, self.n)

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.error_interval()
        return {**asdict(self), "error_rate": self.error_rate, "error_rate_lo": lo, "error_rate_hi": hi}

    def text(self) -> str:
        return (f"{self.error_rate:.2%} failed (n={self.n:,}), p50 {self.p50_s * 1000:.1f} ms, "
                f"p99 {self.p99_s * 1000:.1f} ms")


def by_mode(scope: Scope, service: str, where: str = "1") -> dict[str, Figures]:
    """Figures of the calls to `service` in `scope`'s window, per mode in force (`where`: more conditions)."""
    sql = f"""SELECT toString(mode) AS m, count() AS n, countIf({FAILED_SQL}) AS failed,
       quantileExact(0.5)(duration_ns) AS p50, quantileExact(0.99)(duration_ns) AS p99
FROM {scope.calls()} WHERE dst_service = {quote(service)} AND ({where}) GROUP BY m ORDER BY m"""
    return {m: Figures(m, int(n), int(failed), int(p50) / 1e9, int(p99) / 1e9)
            for m, n, failed, p50, p99 in scope.store.query_rows(sql)}

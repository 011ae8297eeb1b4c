"""What every recommendation carries: its evidence, and the small statistics behind confidence."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Confidence = Literal["high", "medium", "low", "none"]
Kind = Literal["timeout", "retry", "outlier", "connection_pool", "mtls"]


@dataclass(frozen=True, slots=True)
class Evidence:
    """Why a recommendation says what it says: the window, sample size, figures used, confidence, reason."""

    window: str
    n: int
    figures: dict[str, Any]
    confidence: Confidence
    reason: str


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One recommendation for one target; `policy` is None when it recommends nothing (refusal or no need)."""

    kind: Kind
    target: dict[str, str]
    policy: dict[str, Any] | None
    evidence: Evidence
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def not_enough(window: str, n: int, minimum: int, what: str, figures: dict[str, Any] | None = None) -> Evidence:
    """The honest refusal: too few samples to say anything, with the named minimum.

    `figures` keeps what was seen (e.g. the callers of a thin service) for people to look at;
    it never turns into a policy.
    """
    return Evidence(window, n, {**(figures or {}), "minimum": minimum}, "none",
                    f"not enough data (n={n}, need {minimum} {what})")


def confidence_from_n(n: int, medium: int, high: int) -> Confidence:
    return "high" if n >= high else "medium" if n >= medium else "low"


def quantile_confidence(n: int, q: float) -> Confidence:
    """How far a quantile can be trusted: by the number of samples expected above it.

    Fewer than 10 samples beyond the quantile and it is mostly the largest few
    values; 100 or more and it is stable to a few percent.
    """
    beyond = n * (1.0 - q)
    return "high" if beyond >= 100 else "medium" if beyond >= 10 else "low" if beyond >= 1 else "none"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion k/n; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def round_up_ms(seconds: float) -> float:
    """Round a duration up to two significant digits of milliseconds (0.1234 s -> 0.13 s)."""
    ms = max(seconds * 1000.0, 1.0)
    step = 10 ** max(0, int(math.floor(math.log10(ms))) - 1)
    return math.ceil(ms / step) * step / 1000.0


def duration_text(seconds: float) -> str:
    """Istio duration text: '250ms', '2s', '1.5s'."""
    ms = round(seconds * 1000.0)
    if ms < 1000 or ms % 100:
        return f"{ms}ms"
    s = ms / 1000.0
    return f"{int(s)}s" if s == int(s) else f"{s:g}s"

"""The demo's four phases: what each shows, and its share of `--duration`.

Observe comes first and must hold every recommendation's sample minimum: the scarcest is the
timeout's, 1,000 successful cart -> payment calls (analysis/timeouts.py TIMEOUT_MIN_N), which
the default rate makes in ~40 s. So observe takes a third of the duration, and never less
than OBSERVE_MIN_S while the duration leaves the other phases a quarter of it. The rest goes
to dry-run, enforce (twice as long: the guards judge it) and mTLS.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OBSERVE_MIN_S", "Phase", "plan"]

# ~1,100 successful cart -> payment calls at the default 40 requests/s (two thirds are checkouts): the
# timeout's 1,000 with four standard deviations of margin.
OBSERVE_MIN_S = 45.0
OBSERVE_SHARE = 1 / 3
OTHERS_MIN_SHARE = 0.25
# What observe leaves, shared.
AFTER_OBSERVE = (("dry-run", 0.25), ("enforce", 0.5), ("mTLS", 0.25))

SAYS = {
    "observe": "every service in observe: the sidecars, the tap and the apps' spans record every call; "
               "nothing is changed",
    "dry-run": "the recommended policies of inventory and payment (the calls cart makes) stored in the control "
               "plane, both put in dry-run: each policy decides on every call and only notes what it would have done",
    "enforce": "inventory and payment in enforce, each guarded by the control plane: cart's calls to them are "
               "retried, ejected from inventory-3, timed; back to dry-run by itself if that made them worse",
    "mTLS": "who blocks STRICT mTLS, the readiness gate refusing it there, and STRICT where no one does",
}


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    number: int
    of: int

    def announcement(self) -> str:
        return f"phase {self.number}/{self.of} {self.name}, {self.seconds:.0f}s: {SAYS[self.name]}"


def plan(duration: float) -> list[Phase]:
    """The phases of a demo of `duration` seconds of load, in order; their seconds add up to it."""
    observe = max(duration * OBSERVE_SHARE, min(OBSERVE_MIN_S, duration * (1 - OTHERS_MIN_SHARE)))
    rest = duration - observe
    shares = [("observe", observe)] + [(name, rest * share) for name, share in AFTER_OBSERVE]
    return [Phase(name, seconds, i, len(shares)) for i, (name, seconds) in enumerate(shares, 1)]

"""The policy chain: what may change an exchange, at three hooks, in one order.

A policy looks at an exchange at its request head, at each response head, and at an
error or timeout, and answers `None` (continue) or a `Decision`: a local reply, a
retry, or a failure. The chain runs its policies in order and stops at the first
decision that is enforced. A policy in `dry-run` never changes the exchange: its
decision is written down as `would_<action>` and the chain goes on, so that what
dry-run reports is exactly what enforce would have done on the same traffic. The
exchange carries the actions into its record (`action`).

In observe mode the chain is empty and costs nothing (the exchange skips it). The
policies themselves (timeouts, retries, outlier detection, authorization, ...) each
live in a module of their own; this module only knows their shape.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from meshlens.proxy.connect import LocalReply

if TYPE_CHECKING:
    from meshlens.protocols.http1 import ResponseHead
    from meshlens.proxy.exchange import Exchange

__all__ = ["Chain", "Decision", "Kind", "Policy"]

PolicyMode = Literal["dry-run", "enforce"]


class Kind(enum.Enum):
    """What a policy wants done."""

    REPLY = "reply"  # answer the client with `reply`, never reaching (or no longer waiting for) the upstream
    RETRY = "retry"  # try the request again (another attempt, as the exchange's replay buffer allows)
    FAIL = "fail"  # end the exchange with `reply` (after a response started: cut the connection)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    action: str
    """The record's word for it: retried, timed_out, denied, ... (dry-run writes would_<action>)."""
    reply: LocalReply | None = None


class Policy(Protocol):
    """One policy. Every hook may return None (continue) or a Decision."""

    name: str
    mode: PolicyMode

    def on_request(self, exchange: Exchange) -> Decision | None: ...

    def on_response(self, exchange: Exchange, head: ResponseHead) -> Decision | None: ...

    def on_error(self, exchange: Exchange, reply: LocalReply) -> Decision | None: ...


class Chain:
    """Policies in the order they run; `bool(chain)` is False when there are none."""

    __slots__ = ("policies",)

    def __init__(self, policies: list[Policy] | tuple[Policy, ...] = ()) -> None:
        self.policies = tuple(policies)

    def __bool__(self) -> bool:
        return bool(self.policies)

    def __repr__(self) -> str:
        return f"<Chain {[f'{p.name}:{p.mode}' for p in self.policies]}>"

    def on_request(self, ex: Exchange) -> Decision | None:
        for p in self.policies:
            d = p.on_request(ex)
            if d is not None and _enforced(p, d, ex):
                return d
        return None

    def on_response(self, ex: Exchange, head: ResponseHead) -> Decision | None:
        for p in self.policies:
            d = p.on_response(ex, head)
            if d is not None and _enforced(p, d, ex):
                return d
        return None

    def on_error(self, ex: Exchange, reply: LocalReply) -> Decision | None:
        for p in self.policies:
            d = p.on_error(ex, reply)
            if d is not None and _enforced(p, d, ex):
                return d
        return None


def _enforced(policy: Policy, decision: Decision, ex: Exchange) -> bool:
    """Write the decision down; True when it is to be carried out (the policy enforces)."""
    if policy.mode == "enforce":
        ex.actions += (decision.action,)
        return True
    ex.actions += ("would_" + decision.action,)
    return False

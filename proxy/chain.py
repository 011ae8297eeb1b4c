"""The policy chain: what may change an exchange, at four hooks, in one order.

A policy looks at an exchange at its request head, at each response head, at an error
or timeout, and at its end, and answers `None` (continue) or a `Decision`: a local
reply, a retry, a failure, a delay, or a wait for its turn. The chain runs its
policies in order and stops at the first decision that is enforced. A policy in
`dry-run` never changes the exchange: its decision is written down in the dry-run word
(`WOULD`: would_retry, would_timeout, ...) and the chain goes on, so that what dry-run
reports is what enforce does on the same traffic. The exchange carries the actions
into its record (`action`).

In observe mode there is no chain (the route carries no destination policies, and the
exchange skips every hook). The policies themselves live in proxy/policies.py, over
the modules that hold each one's rules (retries, outlier, limits, routing).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from meshlens.proxy.connect import LocalReply

if TYPE_CHECKING:
    from meshlens.protocols.http1 import ResponseHead
    from meshlens.proxy.exchange import Exchange

__all__ = ["WOULD", "Chain", "Decision", "Kind", "Policy", "note"]

PolicyMode = Literal["dry-run", "enforce"]


class Kind(enum.Enum):
    """What a policy wants done."""

    REPLY = "reply"  # answer the client with `reply`, never reaching (or no longer waiting for) the upstream
    RETRY = "retry"  # try the request again after `delay` (another attempt, as the exchange's replay buffer allows)
    FAIL = "fail"  # end the exchange with `reply` (after a response started: cut the connection)
    DELAY = "delay"  # wait `delay` seconds, then run the same policy again (fault injection's delay)
    WAIT = "wait"  # wait until the policy resumes the exchange (`Exchange.resume`: a pending request's turn)


# What the record says a policy did, enforced -> what it says in dry-run (Decision.action, Chain.note).
WOULD = {"retried": "would_retry", "timed_out": "would_timeout", "ejected": "would_eject",
         "overflow": "would_reject_overflow", "rate_limited": "would_rate_limit", "fault_injected": "would_fault",
         "mirrored": "would_mirror", "no_route": "would_no_route", "retry_overflow": "would_retry_overflow",
         "denied": "would_deny", "refused_plaintext": "would_refuse_plaintext"}


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    action: str
    """The record's word for it, enforced: retried, timed_out, overflow, ... (dry-run writes WOULD[action])."""
    reply: LocalReply | None = None
    delay: float = 0.0


class Policy(Protocol):
    """One policy. Every hook may return None (continue) or a Decision; a policy leaves out the hooks it
    does not use (the chain calls only those a policy has), and `on_end` returns nothing."""

    name: str
    mode: PolicyMode

    def on_request(self, exchange: Exchange) -> Decision | None: ...

    def on_response(self, exchange: Exchange, head: ResponseHead) -> Decision | None: ...

    def on_error(self, exchange: Exchange, reply: LocalReply) -> Decision | None: ...

    def on_end(self, exchange: Exchange) -> None: ...


class Chain:
    """Policies in the order they run, by hook; `bool(chain)` is False when there are none."""

    __slots__ = ("policies", "requests", "responses", "errors", "ends", "end")

    def __init__(self, policies: list[Policy] | tuple[Policy, ...] = ()) -> None:
        self.policies = tuple(policies)
        self.requests = tuple(p for p in self.policies if hasattr(p, "on_request"))
        self.responses = tuple(p for p in self.policies if hasattr(p, "on_response"))
        self.errors = tuple(p for p in self.policies if hasattr(p, "on_error"))
        self.ends = tuple(p for p in self.policies if hasattr(p, "on_end"))
        self.end = self.ends[0].on_end if len(self.ends) == 1 else self.on_end
        """What the exchange calls at its end: `on_end`, or the one end hook itself (they decide nothing)."""

    def __bool__(self) -> bool:
        return bool(self.policies)

    def __repr__(self) -> str:
        return f"<Chain {[f'{p.name}:{p.mode}' for p in self.policies]}>"

    def on_request(self, ex: Exchange, start: int = 0) -> Decision | None:
        """From the `start`th request policy on; an enforced decision stops it, and `ex.chain_at` says where
        (DELAY runs that policy again, WAIT the next one, when the exchange goes on)."""
        requests = self.requests if not start else self.requests[start:]
        for p in requests:
            d = p.on_request(ex)
            if d is not None and _enforced(p, d, ex):
                i = self.requests.index(p)
                ex.chain_at = i if d.kind is Kind.DELAY else i + 1
                return d
        return None

    def on_response(self, ex: Exchange, head: ResponseHead) -> Decision | None:
        for p in self.responses:
            d = p.on_response(ex, head)
            if d is not None and _enforced(p, d, ex):
                return d
        return None

    def on_error(self, ex: Exchange, reply: LocalReply) -> Decision | None:
        for p in self.errors:
            d = p.on_error(ex, reply)
            if d is not None and _enforced(p, d, ex):
                return d
        return None

    def on_end(self, ex: Exchange) -> None:
        for p in self.ends:
            p.on_end(ex)


def note(policy: Policy, ex: Exchange, action: str) -> None:
    """Write down what a policy did (enforced) or would have done (dry-run), without a decision."""
    ex.actions += (action if policy.mode == "enforce" else WOULD.get(action, "would_" + action),)


def _enforced(policy: Policy, decision: Decision, ex: Exchange) -> bool:
    """Write the decision down; True when it is to be carried out (the policy enforces)."""
    note(policy, ex, decision.action)
    return policy.mode == "enforce"

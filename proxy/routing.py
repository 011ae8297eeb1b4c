"""A VirtualService's HTTP rules, compiled: which rule a request matches, and where it goes.

No I/O. Istio's semantics (networking/v1alpha3/virtual_service.proto, HTTPRoute and
HTTPMatchRequest), as Envoy's route matching carries them out:

- Rules in order, the first that matches wins; a rule with no `match` matches everything.
  Within a rule, match blocks are ORed; the conditions of one block are ANDed.
- `uri` is matched against the path without its query string (Envoy's `path` and
  `safe_regex`), `authority` against Host, `method` against the method, `headers` by
  lowercase name (an empty match `{}` means the field is present), `queryParams` against
  the query's values; `ignoreUriCase` makes exact and prefix uri matches case-blind.
  A StringMatch is exact, prefix or regex (RE2, matching the whole value).
- A rule's destinations share its traffic by weight, drawn per request (a share is
  weight / total; a weight of 0 takes nothing; a single destination takes everything).
- No rule matching a request to a host that has a VirtualService: Envoy answers 404 `NR`.

Header values are read from the head only when some rule looks at them, and only those
(`field_value`: a search in the lowercased head, not a parse of every field).
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from meshlens.proxy.retries import RetryPolicy

if TYPE_CHECKING:
    from meshlens.protocols.http1 import RequestHead

__all__ = ["Fault", "HttpRule", "Routes", "field_value", "header_fields", "string_matcher"]

Matcher = Callable[[str], bool]


def string_matcher(spec: dict[str, Any], ignore_case: bool = False) -> Matcher:
    """An Istio StringMatch (checked by meshlens.policy.spec: exactly one of exact, prefix, regex)."""
    if "exact" in spec:
        want = str(spec["exact"])
        if ignore_case:
            low = want.lower()
            return lambda v: v.lower() == low
        return lambda v: v == want
    if "prefix" in spec:
        prefix = str(spec["prefix"])
        if ignore_case:
            low = prefix.lower()
            return lambda v: v.lower().startswith(low)
        return lambda v: v.startswith(prefix)
    import re2

    options = re2.Options()
    options.log_errors = False
    pattern = re2.compile(str(spec["regex"]), options)
    return lambda v: pattern.fullmatch(v) is not None


def header_fields(raw: bytes) -> dict[str, str]:
    """A head's fields by lowercase name (repeated ones joined with ','), as a header match reads them."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        out[key] = f"{out[key]},{text}" if key in out else text
    return out


def field_value(raw: bytes, low: bytes, name: bytes) -> str | None:
    """The value of field `name` (lowercase) in a head (`low` is the head lowercased), repeated ones joined
    with ','; None when absent. The same as header_fields(raw).get(name), without reading every field."""
    key = b"\r\n" + name + b":"
    at = low.find(key)
    if at < 0:
        return None
    values = []
    while at >= 0:
        start = at + len(key)
        end = raw.find(b"\r\n", start)
        values.append(raw[start:end if end >= 0 else len(raw)].strip().decode("latin-1"))
        at = low.find(key, start)
    return values[0] if len(values) == 1 else ",".join(values)


Condition = Callable[["RequestHead", bytes], bool]
"""One condition of a match block, on the head and the head lowercased (b'' unless some rule reads fields)."""


def _header(name: bytes, spec: dict[str, Any] | None) -> Condition:
    """A header condition: present (`{}`), or its value as the StringMatch says."""
    key = b"\r\n" + name + b":"
    if not spec:
        return lambda head, low: low.find(key) >= 0
    if set(spec) == {"exact"}:  # the common case, without a call for the value when the field is there once
        want = str(spec["exact"]).encode("latin-1")
        n = len(key)

        def exact(head: RequestHead, low: bytes) -> bool:
            at = low.find(key)
            if at < 0:
                return False
            if low.find(key, at + n) >= 0:  # repeated: the values joined with ','
                return field_value(head.raw, low, name) == want.decode("latin-1")
            raw = head.raw
            end = raw.find(b"\r\n", at + n)
            return raw[at + n:end if end >= 0 else len(raw)].strip() == want
        return exact
    m = string_matcher(spec)
    return lambda head, low: (v := field_value(head.raw, low, name)) is not None and m(v)


def _query(name: str, m: Matcher) -> Condition:
    def cond(head: RequestHead, low: bytes) -> bool:
        params = dict(parse_qsl(head.target.decode("latin-1").partition("?")[2], keep_blank_values=True))
        return name in params and m(params[name])
    return cond


def _port(port: int) -> Condition:
    """Istio's match port: the port the request is addressed to (the Host's, else 80)."""
    def cond(head: RequestHead, low: bytes) -> bool:
        authority = head.authority
        _, sep, text = authority.rpartition(":")
        addressed = int(text) if sep and text.isdigit() and not authority.endswith("]") else 80
        return addressed == port
    return cond


def _block(spec: dict[str, Any]) -> tuple[Condition, ...]:
    """One match block's conditions, all of which must hold."""
    icase = bool(spec.get("ignoreUriCase"))
    conds: list[Condition] = []
    for field, attr in (("uri", "path"), ("method", "method"), ("authority", "authority")):
        if field in spec:
            m = string_matcher(spec[field], icase and field == "uri")
            conds.append(lambda head, low, m=m, attr=attr: m(getattr(head, attr)))
    for name, m in (spec.get("headers") or {}).items():
        conds.append(_header(name.lower().encode("latin-1"), m))
    for name, m in (spec.get("queryParams") or {}).items():
        conds.append(_query(name, string_matcher(m)))
    if spec.get("port") is not None:
        conds.append(_port(int(spec["port"])))
    return tuple(conds)


def _matcher(blocks: list[tuple[Condition, ...]]) -> Condition | None:
    """One rule's match: None when it has none (it matches everything); blocks ORed, conditions ANDed."""
    if not blocks:
        return None
    if len(blocks) == 1 and len(blocks[0]) == 1:
        return blocks[0][0]

    def match(head: RequestHead, low: bytes) -> bool:
        for conds in blocks:
            for cond in conds:
                if not cond(head, low):
                    break
            else:
                return True
        return False
    return match


@dataclass(frozen=True, slots=True)
class Fault:
    """A rule's fault injection: a delay and an abort, each on a share of requests."""

    delay: float = 0.0
    delay_share: float = 0.0
    abort_status: int = 0
    abort_share: float = 0.0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Fault:
        """Istio reads `percentage.value`, else the integer `percent`; with neither, no request is faulted
        (pilot's translateFault)."""
        from meshlens.policy.spec import duration_s

        def share(part: dict[str, Any]) -> float:
            if "percentage" in part:
                return float(part["percentage"].get("value", 0)) / 100
            return float(part.get("percent", 0)) / 100

        delay, abort = spec.get("delay") or {}, spec.get("abort") or {}
        return cls(duration_s(delay["fixedDelay"]) if "fixedDelay" in delay else 0.0, share(delay) if delay else 0.0,
                   int(abort.get("httpStatus", 0)), share(abort) if abort else 0.0)


def applicable_blocks(spec: dict[str, Any], own_labels: dict[str, str]) -> list[dict[str, Any]] | None:
    """The match blocks of an `http` rule that can match calls from this sidecar, or None when none can.

    `sourceLabels` is about the caller, and the caller is this sidecar: a block naming labels its
    workload does not carry never matches here, so it is left out once, when the snapshot is read, and
    costs no request anything. A rule whose every block is left out does not apply here at all (Istio's
    sidecar gets no route for it); a rule without match blocks takes every request."""
    blocks = spec.get("match") or []
    kept = [b for b in blocks if all(own_labels.get(k) == v for k, v in (b.get("sourceLabels") or {}).items())]
    return kept if kept or not blocks else None


class HttpRule:
    """One `http` rule of a VirtualService: its matches, its weighted destinations and its policies."""

    __slots__ = ("name", "match", "destinations", "choices", "total", "cumulative", "timeout", "retry", "fault",
                 "mirror", "mirror_share", "needs_fields")

    def __init__(self, spec: dict[str, Any], service_of: Callable[[str], str],
                 blocks: list[dict[str, Any]] | None = None) -> None:
        """`blocks`: the match blocks that apply to this sidecar (`applicable_blocks`), else all of them."""
        from meshlens.policy.spec import duration_s

        self.name = str(spec.get("name", ""))
        blocks = spec.get("match") or () if blocks is None else blocks
        self.match = _matcher([_block(m) for m in blocks])
        """None: the rule has no match and takes every request."""
        self.needs_fields = any(b.get("headers") for b in blocks)
        dests = spec.get("route") or []
        weighted = [(service_of(d["destination"]["host"]), str(d["destination"].get("subset", "")),
                     int(d.get("weight", 100 if len(dests) == 1 else 0))) for d in dests]
        self.destinations = tuple(d for d in weighted if d[2] > 0) or tuple(weighted[:1])
        self.choices = tuple((service, subset) for service, subset, _ in self.destinations)
        self.total = sum(w for _, _, w in self.destinations) or 1
        self.cumulative = tuple(itertools.accumulate(w for _, _, w in self.destinations))
        self.timeout = duration_s(spec["timeout"]) if spec.get("timeout") else None
        retries = spec.get("retries")
        self.retry = RetryPolicy.from_spec(retries) if retries is not None else None
        self.fault = Fault.from_spec(spec["fault"]) if spec.get("fault") else None
        mirror = spec.get("mirror")
        self.mirror = (service_of(mirror["host"]), str(mirror.get("subset", ""))) if mirror else None
        pct = spec.get("mirrorPercentage")
        self.mirror_share = float(pct.get("value", 0)) / 100 if pct is not None else 1.0

    def __repr__(self) -> str:
        return f"<HttpRule {self.name or '-'} -> {self.destinations}>"

    def matches(self, head: RequestHead, low: bytes = b"") -> bool:
        """`low`: the head lowercased (needed when the rule reads fields)."""
        return self.match is None or self.match(head, low)

    def pick(self, random: Callable[[], float]) -> tuple[str, str]:
        """(service, subset) for one request, by weight."""
        choices = self.choices
        if len(choices) == 1:
            return choices[0]
        return choices[bisect.bisect_right(self.cumulative, random() * self.total)]


class Routes:
    """The HTTP rules for one destination host, in order."""

    __slots__ = ("rules", "matchers", "needs_fields", "source")

    def __init__(self, rules: tuple[HttpRule, ...], source: str) -> None:
        self.rules = rules
        self.matchers = tuple((r.match, r) for r in rules)
        self.needs_fields = any(r.needs_fields for r in rules)
        self.source = source
        """The VirtualService they come from (namespace/name)."""

    def first(self, head: RequestHead) -> HttpRule | None:
        low = head.raw.lower() if self.needs_fields else b""
        for match, rule in self.matchers:
            if match is None or match(head, low):
                return rule
        return None

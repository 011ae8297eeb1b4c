"""VirtualService rules as Istio matches them: first match wins, blocks ORed, conditions ANDed, weights drawn."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from meshlens.protocols.http1 import RequestReader
from meshlens.proxy.routing import HttpRule, Routes, header_fields


def head(raw: bytes) -> Any:
    heads: list[Any] = []

    class Shell:
        def on_request(self, h: Any) -> None:
            heads.append(h)

        def on_request_body(self, data: bytes) -> None:
            pass

        def on_request_end(self, h: Any, n: int) -> None:
            pass

    RequestReader(Shell()).feed(raw)
    return heads[0]


def routes(*rules: dict) -> Routes:
    return Routes(tuple(HttpRule(r, lambda host: host.split(".")[0]) for r in rules), "default/vs")


def first(rs: Routes, raw: bytes) -> str | None:
    rule = rs.first(head(raw))
    return rule.name if rule is not None else None


RULES = routes(
    {"name": "beta", "match": [{"headers": {"X-User-Type": {"exact": "beta-tester"}}}],
     "route": [{"destination": {"host": "pay", "subset": "v2"}}]},
    {"name": "api", "match": [{"uri": {"prefix": "/api/"}, "method": {"exact": "POST"}},
                              {"uri": {"regex": "/v[0-9]+/.*"}}], "route": [{"destination": {"host": "pay"}}]},
    {"name": "debug", "match": [{"headers": {"x-debug": {}}}], "route": [{"destination": {"host": "pay"}}]},
    {"name": "query", "match": [{"queryParams": {"mode": {"exact": "fast"}}, "authority": {"prefix": "pay"}}],
     "route": [{"destination": {"host": "pay"}}]},
    {"name": "exact", "match": [{"uri": {"exact": "/Health"}, "ignoreUriCase": True}],
     "route": [{"destination": {"host": "pay"}}]},
)


@pytest.mark.parametrize("raw, rule", [
    (b"GET / HTTP/1.1\r\nHost: pay\r\nx-user-type: beta-tester\r\n\r\n", "beta"),
    (b"GET / HTTP/1.1\r\nHost: pay\r\nx-user-type: beta-testers\r\n\r\n", None),
    (b"POST /api/x HTTP/1.1\r\nHost: pay\r\nContent-Length: 0\r\n\r\n", "api"),
    (b"GET /api/x HTTP/1.1\r\nHost: pay\r\n\r\n", None),  # the first block wants POST
    (b"GET /v2/orders?x=1 HTTP/1.1\r\nHost: pay\r\n\r\n", "api"),  # the second block: regex, query aside
    (b"GET /v2 HTTP/1.1\r\nHost: pay\r\n\r\n", None),  # a regex matches the whole path
    (b"GET / HTTP/1.1\r\nHost: pay\r\nX-Debug: \r\n\r\n", "debug"),  # presence, even empty
    (b"GET /?mode=fast HTTP/1.1\r\nHost: payments\r\n\r\n", "query"),
    (b"GET /?mode=fast HTTP/1.1\r\nHost: other\r\n\r\n", None),
    (b"GET /health HTTP/1.1\r\nHost: pay\r\n\r\n", "exact"),
])
def test_the_first_matching_rule(raw: bytes, rule: str | None) -> None:
    assert first(RULES, raw) == rule


def test_a_rule_without_match_matches_everything_and_fields_are_read_only_when_needed() -> None:
    rs = routes({"route": [{"destination": {"host": "pay"}}]})
    assert not rs.needs_fields and rs.first(head(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")) is rs.rules[0]
    assert RULES.needs_fields
    assert header_fields(b"GET / HTTP/1.1\r\nA: 1\r\nb: 2\r\na: 3\r\n") == {"a": "1,3", "b": "2"}


def test_weights_share_requests_and_a_zero_weight_takes_none() -> None:
    rule = HttpRule({"route": [{"destination": {"host": "pay", "subset": "v1"}, "weight": 90},
                               {"destination": {"host": "pay", "subset": "v2"}, "weight": 10},
                               {"destination": {"host": "pay", "subset": "v3"}, "weight": 0}]}, lambda h: h)
    rng = random.Random(1)
    got = Counter(rule.pick(rng.random)[1] for _ in range(10_000))
    assert set(got) == {"v1", "v2"} and 850 <= got["v2"] <= 1150  # 1,000 expected, sd 30
    single = HttpRule({"route": [{"destination": {"host": "pay.prod.svc.cluster.local"}}]}, lambda h: h.split(".")[0])
    assert single.pick(rng.random) == ("pay", "")


def test_a_port_match_is_the_port_the_request_is_addressed_to() -> None:
    rs = routes({"name": "8080", "match": [{"port": 8080}], "route": [{"destination": {"host": "pay"}}]},
                {"name": "80", "match": [{"port": 80}], "route": [{"destination": {"host": "pay"}}]})
    assert first(rs, b"GET / HTTP/1.1\r\nHost: pay:8080\r\n\r\n") == "8080"
    assert first(rs, b"GET / HTTP/1.1\r\nHost: pay\r\n\r\n") == "80"
    assert first(rs, b"GET / HTTP/1.1\r\nHost: [fd00::1]\r\n\r\n") == "80"


def test_a_repeated_field_is_matched_as_its_values_joined() -> None:
    rs = routes({"name": "both", "match": [{"headers": {"x-tag": {"exact": "a,b"}}}],
                 "route": [{"destination": {"host": "pay"}}]})
    assert first(rs, b"GET / HTTP/1.1\r\nHost: pay\r\nx-tag: a\r\nX-Tag: b\r\n\r\n") == "both"
    assert first(rs, b"GET / HTTP/1.1\r\nHost: pay\r\nx-tag: a\r\n\r\n") is None

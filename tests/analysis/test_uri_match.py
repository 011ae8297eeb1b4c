"""Route templates → Istio uri matches, checked with RE2 itself (Envoy's safe_regex engine, full match)."""
from __future__ import annotations

import functools
import re

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.analysis.uri_match import precedence, template_regex, unmatched, uri_match, with_trailing_slash


def istio_matches(uri: dict[str, str], request_path: str) -> bool:
    """Would Envoy, as Istio configures it, send a request with this `:path` (query included) to `uri`?

    exact → RouteMatch.path and regex → safe_regex compare the path without its query
    (a regex must match all of it); prefix → RouteMatch.prefix sees the query too.
    """
    path = request_path.partition("?")[0]
    if "exact" in uri:
        return path == uri["exact"]
    if "prefix" in uri:
        return request_path.startswith(uri["prefix"])
    return _re2(uri["regex"]).fullmatch(path) is not None


_re2 = functools.lru_cache(maxsize=None)(re2.compile)


# template, paths it stands for, paths of other routes it must not take
CASES = [
    ("/orders", ["/orders"], ["/orders/1", "/order", "/ordersx"]),
    ("/a/{id}/b.c", ["/a/1/b.c"], ["/a/1/bxc", "/a/1/2/b.c"]),
    ("/stock/{sku}", ["/stock/AB-1.v2+x", "/stock/%2F"], ["/stock/a/history", "/stock/", "/stock"]),
    ("/v1.2/items/{id}", ["/v1.2/items/9"], ["/v1x2/items/9"]),
    ("/price+tax/(x)/{id}", ["/price+tax/(x)/1"], ["/priceetax/(x)/1", "/price+tax/x/1"]),
    ("/users/:id", ["/users/42", "/users/alice"], ["/users/42/orders", "/users"]),
    ("/users/:id?", ["/users", "/users/42"], ["/users/42/x"]),
    ("/u/:id(\\d+)", ["/u/7"], ["/u/7/8"]),
    ("/flights/:from-:to", ["/flights/LHR-JFK"], ["/flights/LHR"]),
    ("/reports/:id(.:format)", ["/reports/7", "/reports/7.csv"], ["/reports/7/x"]),
    ("/orders/<int:order_id>", ["/orders/5"], ["/orders/5/lines"]),
    ("/dl/<path:p>", ["/dl/a/b/c", "/dl"], ["/dlx"]),
    ("api/orders/{id?}", ["/api/orders", "/api/orders/5"], ["/orders/5"]),
    ("{controller=Home}/{action=Index}/{id?}", ["/", "/Home", "/Home/Index/3"], ["/a/b/c/d"]),
    ("/files/{*path}", ["/files", "/files/a/b.txt"], ["/filesystem"]),
    ("/files/{**path}", ["/files/a/b"], ["/filesx"]),
    ("/assets/{path...}", ["/assets/", "/assets/css/site.css"], ["/assetsx/a"]),
    ("/go/{$}", ["/go/"], ["/go/x", "/go"]),
    ("/st/{p:path}", ["/st/a/b"], ["/stx"]),
    ("/static/*", ["/static/", "/static/js/app.js"], ["/staticx"]),
    ("/blobs/*key", ["/blobs/a/b"], ["/blob"]),
    ("/s/**", ["/s", "/s/a/b"], ["/sx"]),
    ("/a/*/b", ["/a/x/b", "/a//b"], ["/a/x/y/b"]),
    ("/files*", ["/files", "/files.tar"], ["/file"]),
    ("/docs/[...slug]", ["/docs/a/b"], ["/doc"]),
    ("/x/[id]", ["/x/1"], ["/x/1/2"]),
    ("/g/{id:[0-9]{3}}", ["/g/123"], ["/g/1/2"]),
    ("/v1/{name}:cancel", ["/v1/op1:cancel"], ["/v1/op1"]),
    ("/q?x={id}", ["/q"], ["/qx"]),
    ("/a/{id}.json", ["/a/42.json"], ["/a/42xjson", "/a/42"]),
]


@pytest.mark.parametrize("template, paths, others", CASES, ids=[c[0] for c in CASES])
def test_template_matches_its_paths_and_not_others(template, paths, others):
    m = uri_match(template)
    for p in paths:
        assert istio_matches(m, p), (m, p)
        assert istio_matches(m, p + "?page=2&next=/a/b"), (m, p)  # the query never changes the outcome
    for p in others:
        assert not istio_matches(m, p), (m, p)
    assert unmatched(m, paths) == [] and unmatched(m, others) == others


def test_literal_routes_are_exact_and_regexes_escape_literals():
    assert uri_match("/orders") == {"exact": "/orders"}
    assert uri_match("/a/{id}/b.c") == {"regex": r"^/a/[^/]+/b\.c$"}
    assert uri_match("/price+tax/{id}") == {"regex": r"^/price\+tax/[^/]+$"}


def test_trailing_slash_variant():
    assert with_trailing_slash({"exact": "/orders"}) == {"regex": "^/orders/?$"}
    m = with_trailing_slash(uri_match("/members/:id"))
    assert istio_matches(m, "/members/1/") and istio_matches(m, "/members/1") and not istio_matches(m, "/members/1/x")


def test_precedence_puts_literals_first_and_catch_alls_last():
    ordered = sorted(["/users/{*rest}", "/users/:id", "/users/export", "/users/:id/orders"], key=precedence)
    assert ordered == ["/users/export", "/users/:id/orders", "/users/:id", "/users/{*rest}"]


# Property: any template built from literal segments and placeholders in any supported syntax
# matches (RE2, full match) every path made by filling its placeholders, and not a path where a
# one-segment value spans two segments or a literal character changed.
LITERAL_CHARS = "abcXYZ019-_.~+$^|\\!@&=,;%'"
literal = st.text(LITERAL_CHARS, min_size=1, max_size=6)
value = st.text("abz09-_.~+$%:@!()[]{}*", min_size=1, max_size=8)
rest_value = st.lists(value, max_size=3).map("/".join)
name = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
SEGMENT = ["{%s}", ":%s", "<%s>", "<int:%s>", "[%s]", "{%s:int}", "{%s:[0-9]+}"]
REST = ["{*%s}", "{**%s}", "{%s...}", "*%s", "<path:%s>", "[...%s]", "{%s:path}"]
OPTIONAL = ["{%s?}", ":%s?"]


@st.composite
def template_and_path(draw):
    """(template, a path it stands for, pieces) with pieces = [(kind, template text, path text)]."""
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            lit = draw(literal)
            pieces.append(("lit", lit, lit))
        else:
            pieces.append(("seg", draw(st.sampled_from(SEGMENT)) % draw(name), draw(value)))
    tail = draw(st.sampled_from(["none", "rest", "optional"]))
    template = "".join("/" + t for _, t, _ in pieces)
    path = "".join("/" + p for _, _, p in pieces)
    if tail == "rest":
        template += "/" + draw(st.sampled_from(REST)) % draw(name)
        path += "/" + draw(rest_value) if draw(st.booleans()) else ""
    elif tail == "optional":
        template += "/" + draw(st.sampled_from(OPTIONAL)) % draw(name)
        path += "/" + draw(value) if draw(st.booleans()) else ""
    return template, path, pieces, tail


@settings(max_examples=400, deadline=None)
@given(template_and_path())
def test_every_filled_template_matches(case):
    template, path, _, _ = case
    rx = template_regex(template)
    assert re2.fullmatch(rx, path) is not None, (template, rx, path)
    assert re.fullmatch(rx, path) is not None  # what analysis.uri_match.unmatched relies on
    assert istio_matches(uri_match(template), path + "?q=1")


@settings(max_examples=400, deadline=None)
@given(template_and_path(), st.data())
def test_a_wrong_path_does_not_match(case, data):
    template, _, pieces, tail = case
    if tail != "none":
        return  # a catch-all or optional tail may legitimately take the altered path
    i = data.draw(st.integers(0, len(pieces) - 1))
    kind, _, text = pieces[i]
    if kind == "seg":
        altered = text + "/" + text  # one segment's value spanning two segments
    else:
        j = data.draw(st.integers(0, len(text) - 1))
        altered = text[:j] + ("#" if text[j] != "#" else "?") + text[j + 1:]  # a literal character changed
    path = "".join("/" + (altered if k == i else p) for k, (_, _, p) in enumerate(pieces))
    assert re2.fullmatch(template_regex(template), path) is None, (template, path)

"""Route templates as Istio `uri` matches that match the recorded paths they stand for.

A route template comes from meshlens (`/users/{id}`, analysis.routes) or from the
application's own spans (`http.route`), written in its framework's syntax. The
OpenTelemetry HTTP conventions (semantic-conventions docs/http/http-spans.md)
ask only for "dynamic path segments represented with placeholders" and give
`/users/:userID?` and `my-controller/my-action/{id?}` as examples. Understood here:

- one segment: `{id}`, `{id:int}`, `{id:[0-9]+}` (OpenAPI, ASP.NET, Spring, aiohttp,
  gorilla), `:id`, `:id(\\d+)` (Express, Rails, Gin, Echo), `<id>`, `<int:id>`
  (Flask, Django), `[id]` (Next.js; ASP.NET `[controller]` tokens); a placeholder
  may share its segment with literal text (`/{id}.json`, `/:from-:to`);
- optional: `{id?}`, `{id=default}`, `:id?`, Rails groups holding a placeholder `(.:format)`;
- the rest of the path: `{*rest}`, `{**rest}` (ASP.NET, Spring), `{rest...}` (Go 1.22),
  `{p:path}` (Starlette), `<path:p>` (Flask), `*name` (Gin, Rails, Express 5), `:p*`,
  `:p+` (Express 4), `[...slug]`, `[[...slug]]` (Next.js), `**` (Spring), and a `*`
  that ends the template (Express 4, chi, Echo); a `*` inside a template stays
  within one segment (Spring's AntPathMatcher); Go's `{$}` matches nothing more.
A template without a leading `/` (ASP.NET, Django) gets one; a `?` or `#` that
no placeholder claims starts a query or fragment and ends the template.

What Istio and Envoy do with a `uri` match: pilot's TranslateRouteMatch
(pilot/pkg/networking/core/route/route.go) turns `exact` into Envoy's
`RouteMatch.path`, `prefix` into `prefix` (`path_separated_prefix` only under
Ingress/Gateway API semantics) and `regex` into `safe_regex` (RE2). Envoy's
RouteMatch (api/envoy/config/route/v3/route_components.proto) compares `path`
and `safe_regex` with the `:path` header once the query string is removed, and
the regex must match the whole of it ("the rule will not match if only a
subsequence of the :path header matches"); `prefix` is compared with the start
of the `:path` *including* the query string. So a literal route becomes
`exact` and anything else an anchored regex (the anchors are redundant under
full match, and harmless): both ignore `?query`, as the recorded `path`
(query stripped, not percent-decoded, like Envoy's `:path`) does. `prefix` is
never written: `/files` as a prefix would also take `/filesystem`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["lit", "seg", "part", "rest", "opt"]

# A segment variable matches one non-empty segment; a catch-all anything after it.
SEGMENT_RE = "[^/]+"
WITHIN_SEGMENT_RE = "[^/]*"
REST_RE = ".*"
# Outside a character class these are RE2's metacharacters; everything else is literal.
_META = frozenset("\\.+*?()|[]{}^$")
# `:name` is a placeholder after these (or at the start); elsewhere (`{name}:cancel`) it is text.
_COLON_AFTER = frozenset("/.-(")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a parsed template: literal text, a variable, or an optional group of parts."""

    kind: Kind
    text: str = ""
    parts: tuple[Part, ...] = ()


def escape(text: str) -> str:
    """`text` as an RE2 literal: a backslash before each metacharacter (RE2 accepts `\\` + punctuation)."""
    return "".join("\\" + c if c in _META else c for c in text)


def parse(template: str) -> tuple[Part, ...]:
    """The template as parts; a leading `/` is added when missing, a bare `?`/`#` ends it."""
    if not template.startswith("/"):
        template = "/" + template
    parts, _ = _parse(template, 0, None)
    return tuple(_merge(parts))


def _parse(t: str, i: int, close: str | None) -> tuple[list[Part], int]:
    out: list[Part] = []
    kind: Kind
    while i < len(t):
        c = t[i]
        if c == close:
            return out, i + 1
        if c in "?#":
            return out, len(t)
        if c == "{" and (end := _closing(t, i, "{", "}")) > 0:
            _brace(t[i + 1:end], out)
            i = end + 1
        elif c == "<" and (end := t.find(">", i)) > 0 and "/" not in t[i:end]:
            conv, _, _name = t[i + 1:end].rpartition(":")
            _variable(out, "rest" if conv == "path" else "seg")
            i = end + 1
        elif c == "[" and (end := _closing(t, i, "[", "]")) > 0 and "/" not in t[i:end]:
            inner = t[i + 1:end]
            if inner.startswith("[...") and inner.endswith("]"):
                _variable(out, "rest", optional=True)
            else:
                _variable(out, "rest" if inner.startswith("...") else "seg")
            i = end + 1
        elif c == ":" and (m := _IDENT.match(t, i + 1)) and (i == 0 or t[i - 1] in _COLON_AFTER):
            i = m.end()
            kind = "seg"
            # Express's own pattern for the parameter, `:id(\\d+)`; a group holding a placeholder
            # is Rails' optional `(.:format)`, parsed on the next turn.
            if i < len(t) and t[i] == "(" and (end := _closing(t, i, "(", ")")) > 0 and ":" not in t[i:end]:
                kind = "rest" if t[i + 1:end] in (".*", ".+", "*") else "seg"
                i = end + 1
            mod = t[i] if i < len(t) and t[i] in "?*+" else ""
            i += len(mod)
            _variable(out, "rest" if mod in ("*", "+") else kind, optional=mod in ("?", "*"))
        elif c == "*":
            if t.startswith("**", i):
                i += 2
                kind = "rest"
            elif m := _IDENT.match(t, i + 1):
                i = m.end()
                kind = "rest"
            else:
                i += 1
                kind = "rest" if i == len(t) else "part"
            _variable(out, kind)
        elif (c == "(" and (end := _closing(t, i, "(", ")")) > 0
              and _has_variable(inner := _parse(t[:end], i + 1, None)[0])):
            out.append(Part("opt", parts=tuple(_merge(inner))))  # Rails' `(.:format)`; `(x)` is text
            i = end + 1
        else:
            out.append(Part("lit", c))
            i += 1
    return out, i


def _has_variable(parts: list[Part]) -> bool:
    return any(p.kind != "lit" for p in parts)


def _brace(inner: str, out: list[Part]) -> None:
    """`{…}`: Go's `{$}`, catch-alls, optional and constrained variables."""
    if inner == "$":
        return
    if inner.startswith("*"):
        _variable(out, "rest")
        return
    if inner.endswith("..."):
        _variable(out, "rest")
        return
    name, _, constraint = inner.partition(":")
    optional = name.endswith("?") or "=" in name or constraint.endswith("?")
    rest = constraint.strip() in ("path", ".*", ".+")
    _variable(out, "rest" if rest else "seg", optional=optional and not rest)


def _variable(out: list[Part], kind: Kind, optional: bool = False) -> None:
    """Append a variable; a catch-all or optional one right after `/` takes that `/` with it.

    `/files/{*p}` matches `/files` as well as `/files/a/b` (ASP.NET, Spring); `/users/:id?`
    matches `/users`. Without the slash in the group, `/files/{*p}` would need `/files/`.
    """
    if (kind == "rest" or optional) and out and out[-1] == Part("lit", "/"):
        out.pop()
        out.append(Part("opt", parts=(Part("lit", "/"), Part(kind))))
    elif optional:
        out.append(Part("opt", parts=(Part(kind),)))
    else:
        out.append(Part(kind))


def _closing(t: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at `i` (nested ones counted), or -1."""
    depth = 0
    for j in range(i, len(t)):
        depth += (t[j] == open_) - (t[j] == close)
        if depth == 0:
            return j
    return -1


def _merge(parts: list[Part]) -> list[Part]:
    """Adjacent literal characters as one literal part."""
    out: list[Part] = []
    for p in parts:
        if p.kind == "lit" and out and out[-1].kind == "lit":
            out[-1] = Part("lit", out[-1].text + p.text)
        else:
            out.append(p)
    return out


def _regex(parts: tuple[Part, ...]) -> str:
    pieces = {"seg": SEGMENT_RE, "part": WITHIN_SEGMENT_RE, "rest": REST_RE}
    out = []
    for p in parts:
        if p.kind == "lit":
            out.append(escape(p.text))
        elif p.kind == "opt":
            out.append(f"(?:{_regex(p.parts)})?")
        else:
            out.append(pieces[p.kind])
    return "".join(out)


def template_regex(template: str) -> str:
    """RE2 regex matching exactly the paths `template` stands for, anchored at both ends.

    When every part is optional (`{controller=Home}/{action=Index}/{id?}`) the
    template also stands for `/` itself.
    """
    parts = parse(template)
    root = "/?" if all(p.kind == "opt" for p in parts) else ""
    return "^" + _regex(parts) + root + "$"


def uri_match(template: str) -> dict[str, str]:
    """The Istio `uri` StringMatch for a route template: `exact` when it has no variable part, else `regex`."""
    parts = parse(template)
    if all(p.kind == "lit" for p in parts):
        return {"exact": "".join(p.text for p in parts)}
    return {"regex": template_regex(template)}


def with_trailing_slash(match: dict[str, str]) -> dict[str, str]:
    """The same match also taking one trailing `/` (Express, and others, route `/a/` like `/a` by default)."""
    if "exact" in match:
        path = match["exact"]
        return {"regex": "^" + escape(path.rstrip("/")) + "/?$"} if path != "/" else match
    rx = match["regex"]
    return {"regex": rx[:-1] + "/?$"} if not rx.endswith("/$") and not rx.endswith(".*$") else match


def unmatched(match: dict[str, str], paths: list[str] | tuple[str, ...]) -> list[str]:
    """The paths Istio would not send to this match (exact: equal; prefix: starts with; regex: full match).

    Python's `re` stands in for RE2 here: the regexes of this module use only
    escaped literals, `[^/]`, `.`, `*`, `+`, `?`, non-capturing groups and
    anchors, on which the two agree (tests/analysis/test_uri_match.py checks
    the same matches with RE2 itself).
    """
    if "exact" in match:
        return [p for p in paths if p != match["exact"]]
    if "prefix" in match:
        return [p for p in paths if not p.startswith(match["prefix"])]
    rx = re.compile(match["regex"])
    return [p for p in paths if rx.fullmatch(p) is None]


def precedence(template: str) -> tuple[int, int, int]:
    """Sort key putting the more specific of two overlapping matches first.

    Istio uses the first `http` entry that matches, while frameworks prefer a
    literal route to a variable one (`/users/export` over `/users/:id`): exact
    matches first, then fewer catch-alls, then more literal text.
    """
    parts = parse(template)
    flat = list(_flatten(parts))
    literal = sum(len(p.text) for p in flat if p.kind == "lit")
    variable = any(p.kind != "lit" for p in flat)
    return (int(variable), sum(p.kind in ("rest", "part") for p in flat), -literal)


def _flatten(parts: tuple[Part, ...]):
    for p in parts:
        if p.kind == "opt":
            yield from _flatten(p.parts)
        else:
            yield p

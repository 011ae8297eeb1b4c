"""The checks every kind's spec is made of: value kinds, messages (tables of fields), lists, maps.

A message refuses a field it does not know, by name (SpecError carries the path, which
meshlens/policy/resources.py turns into 'FILE document N: spec.a.b[2] (line L)'), and accepts a
field meshlens stores but does not enforce yet with a warning (`UNSUPPORTED`), never
silently. Checks are synchronous: the warnings of one spec are gathered while it runs.
"""
from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["UNSUPPORTED", "SpecError", "Where", "checked_by_caller", "duration", "duration_s", "enum", "list_of",
           "map_of", "message", "percent", "regex", "run", "status", "string", "string_match", "boolean", "uint"]

Where = tuple  # a path into the spec: keys and list indices


class SpecError(ValueError):
    """A spec Istio would refuse (or that meshlens cannot read as meant); names the field."""

    def __init__(self, path: Where, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.resource: Any = None
        """The resource it is about, when the check spans several (check_references)."""


# Go's time.ParseDuration units, as Istio's YAML takes them ("30s", "1m30s", "100ms").
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(h|m|s|ms|us|µs|ns))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float:
    """Seconds of a duration as Istio writes them; ValueError otherwise."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 1m30s, 100ms)")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))


# -- value kinds -------------------------------------------------------------------------------------

def string(v: Any, path: Where) -> None:
    if not isinstance(v, str):
        raise SpecError(path, f"must be a string, not {_type(v)}")


def boolean(v: Any, path: Where) -> None:
    if not isinstance(v, bool):
        raise SpecError(path, f"must be true or false, not {_type(v)}")


def uint(v: Any, path: Where) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SpecError(path, f"must be a whole number of 0 or more, not {v!r}")


def duration(v: Any, path: Where) -> None:
    try:
        if duration_s(v) <= 0:
            raise ValueError(f"{v!r} must be more than 0")
    except ValueError as e:
        raise SpecError(path, str(e)) from None


def percent(v: Any, path: Where) -> None:
    message(_PERCENT)(v, path)
    value = v.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100):
        raise SpecError(path + ("value",), f"must be a number from 0 to 100, not {value!r}")


def status(v: Any, path: Where) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 200 <= v <= 599:
        raise SpecError(path, f"must be an HTTP status code (200-599), not {v!r}")


def list_of(item: Callable[[Any, Where], None]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, list):
            raise SpecError(path, f"must be a list, not {_type(v)}")
        for i, x in enumerate(v):
            item(x, path + (i,))
    return check


def map_of(value: Callable[[Any, Where], None]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, dict):
            raise SpecError(path, f"must be a mapping, not {_type(v)}")
        for k, x in v.items():
            if not isinstance(k, str):
                raise SpecError(path, f"keys must be strings, not {k!r}")
            value(x, path + (k,))
    return check


def string_match(v: Any, path: Where) -> None:
    message(_STRING_MATCH)(v, path)
    given = [k for k in ("exact", "prefix", "regex") if k in v]
    if len(given) != 1:
        raise SpecError(path, f"must hold exactly one of exact, prefix, regex (has {', '.join(given) or 'none'})")
    if "regex" in v:
        regex(v["regex"], path + ("regex",))


def regex(v: Any, path: Where) -> None:
    string(v, path)
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(v, options)
    except re2.error as e:
        text = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise SpecError(path, f"{v!r} is not an RE2 regular expression: {text}") from None


def message(fields: dict[str, Any]) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if not isinstance(v, dict):
            raise SpecError(path, f"must be a mapping, not {_type(v)}")
        for k, x in v.items():
            spec = fields.get(k)
            if spec is None:
                known = ", ".join(fields)
                raise SpecError(path + (k,), f"unknown field (known here: {known})")
            if spec is UNSUPPORTED:
                _WARNINGS.append((path + (k,), "is not enforced by meshlens yet: stored as written"))
            elif callable(spec):
                spec(x, path + (k,))
    return check


def _type(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), type(v).__name__)


UNSUPPORTED = object()  # an Istio field meshlens stores and does not enforce yet: a warning


def checked_by_caller(v: Any, path: Where) -> None:
    """A field its message's own check looks at (after the fields are known)."""
_WARNINGS: list[tuple[Where, str]] = []  # filled while one spec is checked (checks are synchronous)


_PERCENT = {"value": checked_by_caller}
_STRING_MATCH = {"exact": string, "prefix": string, "regex": checked_by_caller}


def enum(*values: str) -> Callable[[Any, Where], None]:
    def check(v: Any, path: Where) -> None:
        if v not in values:
            raise SpecError(path, f"must be one of {', '.join(values)}, not {v!r}")
    return check


def run(check: Callable[[Any, Where], None], spec: Any) -> list[tuple[Where, str]]:
    _WARNINGS.clear()
    try:
        check(spec, ())
        return list(_WARNINGS)
    finally:
        _WARNINGS.clear()



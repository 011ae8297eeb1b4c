"""W3C Trace Context: the one `traceparent` parser, for the proxy and the tap alike.

`version-traceid-parentid-flags`, lowercase hex. Version `ff` is invalid; version
`00` is exactly 55 characters; a later version is read for the fields version 00
defines and continued, as the spec asks ("parse the fields you know"): at least 55
characters, and if longer, a `-` after the flags. A trace id or parent id of all
zeros is invalid.
"""
from __future__ import annotations

import re

__all__ = ["parse_traceparent"]

_FIELDS = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


def parse_traceparent(value: bytes | str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid `traceparent`, else None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    value = value.strip(b" \t")
    m = _FIELDS.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == b"00" or value[55:56] != b"-"):
        return None
    return trace_id.decode(), span_id.decode(), flags.decode()

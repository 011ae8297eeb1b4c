"""The call-batch wire format: what sidecars and taps POST to the collector's /v1/calls.

Columnar JSON, because a producer builds it by transposing rows (one C-speed zip)
and encoding a few lists (C-speed json), with no dependency that a sidecar would
have to load:

    {"v": 1, "id": "9f3c2a1be07d4411-42", "n": 3,
     "columns": {"time": [..3 ints..], "path": ["/a", "/b", "/a"], "dst_service": {"all": "cart"}}}

  - "id" (optional): the producer's name for the batch, the same on every resend of it:
    1 to MAX_BATCH_ID_CHARS of A-Z a-z 0-9 . _ : - (the recorder's is a random id of the
    recorder, a dash and the batch's number). The collector stores an id once: a batch
    whose id it already accepted is answered 200 with "duplicate": true and not stored
    again. Bodies without one (older producers) are stored as they come.
  - a column is a list of n values, or {"all": value} when every row holds that one
    value: the services, addresses, protocol and mode of a sidecar's batch are sent once,
    not n times.
  - absent columns take their defaults; unknown columns are refused by name, so a newer
    producer talking to an older collector fails loudly instead of losing fields (an
    older collector refuses {"all": ...} too, as not a list; it ignores "id").

Bodies may be gzip-compressed (Content-Encoding: gzip).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshlens.collector.record import CALL_COLUMN_NAMES, CALL_COLUMNS

CONTENT_TYPE = "application/x-meshlens-calls+json"
VERSION = 1
# Room for a UUID (36 characters) and a sequence number; bounded because the collector
# keeps every id it accepted for a while (collector/spool.py REMEMBERED_BATCH_IDS).
MAX_BATCH_ID_CHARS = 64
_BATCH_ID = re.compile(r"[A-Za-z0-9._:-]+")
_KNOWN = frozenset(CALL_COLUMN_NAMES)
_DEFAULTS: dict[str, Any] = {c.name: c.default() for c in CALL_COLUMNS}
_NO_DEFAULT = object()  # an unknown column is never omitted: the collector must refuse it by name
_VARIES, _UNSEEN = object(), object()
# One encoder for every list: json.dumps with arguments builds a new one per call, and the
# check for circular references costs a dict operation per row's attributes, measured.
_JSON = json.JSONEncoder(separators=(",", ":"), check_circular=False)


class BatchFormatError(ValueError):
    """The producer sent a batch we cannot read (answered with 400 and this message)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded body: the producer's id for it (None from older producers), its row count and columns."""

    id: str | None
    n: int
    columns: dict[str, list[Any]]


def check_batch_id(value: object) -> str:
    """`value` if it is a valid batch id, else BatchFormatError saying what is wrong, in one line."""
    if type(value) is not str:
        raise BatchFormatError(f"'id' must be a string (the producer's batch id), not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_BATCH_ID_CHARS:
        raise BatchFormatError(f"'id' must be 1 to {MAX_BATCH_ID_CHARS} characters, not {len(value)}")
    if not _BATCH_ID.fullmatch(value):
        raise BatchFormatError("'id' may hold only A-Z a-z 0-9 . _ : -")
    return value


# -- encoding ----------------------------------------------------------------------------


def encode(columns: Mapping[str, Sequence[Any]], batch_id: str | None = None) -> bytes:
    """A body from whole columns of one length, in one go (tests, tools, small producers)."""
    return b"".join(encode_slices(tuple(columns), [tuple(columns.values())] if columns else [], batch_id))


def encode_slices(names: Sequence[str], slices: Iterable[Sequence[Sequence[Any]]], batch_id: str | None = None,
                  pause: Callable[[], None] = lambda: None) -> list[bytes]:
    """A body, in pieces, from a batch given as consecutive slices of its rows, each a sequence of columns in `names` order.

    A column whose every value is its default, of its type, is left out: the collector
    fills an absent column with exactly that default (collector.columns DEFAULTS for the
    table and collector.spans for the spans it derives both come from `Column.default()`),
    so stored rows and spans are identical. A column of more than one row whose every
    value is one value, of one type, is sent once ({"all": v}). 0.0 or False are not 0
    to the collector's type checks and must still reach them, hence the type.

    One pass, a slice at a time (a generator may cut them from a buffer): a column that
    has held one value so far is only compared; one that varies is encoded, one json call
    a slice, the rows before it written out as that one value. `pause()` runs after each
    slice, so that a caller sharing the interpreter with a server (collector/client.py)
    can let it run: the work between two pauses grows with the slice, never with the
    batch, and no slice outlives its step (the cyclic GC would walk every one kept, ~3 ms
    for a 5,000-call batch, measured). The body comes back in pieces, never joined: a copy
    of a whole body holds the interpreter lock for milliseconds (fresh pages), measured.
    """
    if batch_id is not None:
        check_batch_id(batch_id)  # a producer's bug: refuse here, not at the collector
    same: list[Any] = [_UNSEEN] * len(names)  # each column's one value so far, or _VARIES
    pieces: list[list[bytes]] = [[] for _ in names]
    n = 0
    for cols in slices:
        k = len(cols[0]) if cols else 0
        if not k:
            continue
        for i, values in enumerate(cols):
            v = same[i]
            if v is not _VARIES:
                if v is _UNSEEN:
                    v = values[0]
                if values.count(v) == k:  # C-speed ==, then the exact type
                    kind = type(v)
                    if kind is str or kind is dict or set(map(type, values)) == {kind}:
                        same[i] = v  # == "" is only ever a str; == {} an empty dict (JSON cannot carry other mappings)
                        continue
                same[i] = _VARIES
                if n:
                    pieces[i].append(",".join([_JSON.encode(v)] * n).encode())
            text = _JSON.encode(values)[1:-1]  # a tuple encodes as a list: its brackets go
            pieces[i].append(("," + text if pieces[i] else text).encode())
        n += k
        pause()
    entries, listed = [], []
    for i, v in enumerate(same):
        if v is _VARIES or v is _UNSEEN:  # _UNSEEN: no rows at all, an empty list
            listed.append(i)
        elif n == 1:
            if not _is_default(names[i], v):
                pieces[i].append(_JSON.encode(v).encode())
                listed.append(i)
        elif not _is_default(names[i], v):
            entries.append(f'{_JSON.encode(names[i])}:{{"all":{_JSON.encode(v)}}}')
    if n and not entries and not listed:  # every column default: one stays to carry n (decode refuses n rows of nothing)
        entries.append(f'{_JSON.encode(names[0])}:{{"all":{_JSON.encode(same[0])}}}')
    text = f'{{"v":{VERSION},' + (f'"id":"{batch_id}",' if batch_id is not None else "")
    text += f'"n":{n},"columns":{{{",".join(entries)}'
    out = []
    for j, i in enumerate(listed):
        out.append(f'{text}{"," if entries or j else ""}{_JSON.encode(names[i])}:['.encode())
        out += pieces[i]
        text = "]"
    out.append(f"{text}}}}}".encode())
    return out


def _is_default(name: str, value: Any) -> bool:
    default = _DEFAULTS.get(name, _NO_DEFAULT)
    return type(value) is type(default) and value == default


# -- decoding ----------------------------------------------------------------------------


def decode(body: bytes) -> Batch:
    """Parse and check the envelope; value types are checked when the Arrow table is built."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise BatchFormatError(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BatchFormatError("batch must be a JSON object with v, n and columns")
    v = doc.get("v")
    if type(v) is not int or v != VERSION:  # not True, not 1.0
        raise BatchFormatError(f"unsupported batch version {v!r}: this collector reads v{VERSION}")
    batch_id = check_batch_id(doc["id"]) if "id" in doc else None
    n, columns = doc.get("n"), doc.get("columns")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise BatchFormatError("'n' must be the number of rows (a non-negative integer)")
    if not isinstance(columns, dict):
        raise BatchFormatError("'columns' must be an object of column name to list of values")
    if n and not columns:
        raise BatchFormatError(f"'n' is {n} but no columns were sent")
    unknown = sorted(set(columns) - _KNOWN)
    if unknown:
        raise BatchFormatError(f"unknown column(s): {', '.join(map(str, unknown[:5]))}")
    for name, values in columns.items():
        if isinstance(values, list) and len(values) == n:
            if name == "attributes":
                columns[name] = [_pairs(v, i) for i, v in enumerate(values)]
        elif isinstance(values, dict) and len(values) == 1 and "all" in values:
            one = _pairs(values["all"], None) if name == "attributes" else values["all"]
            columns[name] = [one] * n
        else:
            raise BatchFormatError(f'column {name!r} must be a list of {n} values or {{"all": value}}')
    return Batch(batch_id, n, columns)


def _pairs(value: Any, row: int | None) -> list[tuple[str, str]]:
    """One row's attributes (None: every row's, sent once) as key-value pairs."""
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return list(value.items())
    raise BatchFormatError(f"attributes of {'every row' if row is None else f'row {row}'} must be an object of strings")

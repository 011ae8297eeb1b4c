"""The record of one control-plane change, and the body of POST /v1/changes that carries it.

`MeshChange` is the one definition of a row of `mesh_changes`: the control plane
(control/changes.py) builds its rows from it, the collector checks a body against it
(`decode`), and collector/columns.py derives the Arrow schema from `CHANGE_COLUMNS`.
The table itself is what migration 4 in collector/schema.py built, frozen as written;
tests/collector/test_migrations.py checks that the two agree.

    POST /v1/changes   Content-Type: application/json
    {"changes": [{"time": 1764651780123456000, "revision": 42, "who": "ana", "kind": "Mode",
                  "name": "payment-service", "service": "payment-service", "action": "configured",
                  "from_mode": "observe", "to_mode": "dry-run", "before": {...}, "after": {...},
                  "reason": "try the retry policy", "control_id": "cp-1:15010"}, ...]}

Every field is checked by name, type and size, and the first one wrong is refused in one
line (400). `before` and `after` are the documents (objects, or null when there is none),
stored as compact JSON text ('' for none). A change is identified by (revision, time,
kind, name): the collector stores each once however often it arrives (`change_id`).

Standard library only: the control plane ships changes without loading pyarrow.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from meshlens.collector.record import MODES, Column

__all__ = ["ACTIONS", "CHANGE_COLUMNS", "CHANGE_COLUMN_NAMES", "MAX_CHANGES", "MAX_DOCUMENT_BYTES", "ChangeFormatError",
           "MeshChange", "change_id", "decode"]

ACTIONS: tuple[str, ...] = ("created", "configured", "deleted")
# Changes in one request: the control plane sends at most 100 (control/changes.py); room for more.
MAX_CHANGES = 1_000
# One document, as JSON: no document can be larger than the control plane's apply body
# (control/api.py MAX_APPLY_BYTES, kubectl's default request limit).
MAX_DOCUMENT_BYTES = 3 * 1024 * 1024
# The largest revision: etcd's and SQLite's are signed 64-bit integers.
MAX_REVISION = 2**63 - 1


def _column(kind: str, doc: str, limit: int = 0, default: Any = "") -> Any:
    """A field of `MeshChange`: its column kind (collector/record.py's KIND_SQL), meaning and longest value."""
    return field(default=default, metadata={"kind": kind, "doc": doc, "limit": limit})


@dataclass(frozen=True, slots=True)
class MeshChange:
    """One change the control plane stored (an apply, a delete, a mode set), as an audit row.

    The control plane's store is the truth; this is its copy beside the calls, so that
    dashboards can mark a mode switch or a policy change on the traffic it changed.
    """

    time: int = _column("time", "When the change was stored: ns since the Unix epoch (UTC).", default=0)
    revision: int = _column("u64", "The store revision of the change (one apply's resources may share one, on etcd).",
                            default=0)
    who: str = _column("lcstr", "Who made it: the CLI's user, or the name of the API token.", 256)
    kind: str = _column("lcstr", "The resource's kind: Mesh, Mode, VirtualService, DestinationRule, ...", 64)
    name: str = _column("lcstr", "The resource's name: namespace/name for Istio's kinds, the service for a Mode.", 512)
    service: str = _column("lcstr", "The service it is about: a Mode's, the one a host names, a rate limit's, the "
                                    "app a selector picks (several comma-separated); '' for the mesh.", 1024)
    action: str = _column("lcstr", "created, configured or deleted.")
    from_mode: str = _column("lcstr", "For a Mode: the mode in force before (observe when it was created: a "
                                      "service nobody switched is observed); '' for other kinds.")
    to_mode: str = _column("lcstr", "For a Mode: the mode in force after (observe when it was deleted); '' else.")
    before: dict[str, Any] | None = _column("str", "The document before, stored as JSON; '' when it was created.",
                                            default=None)
    after: dict[str, Any] | None = _column("str", "The document after, stored as JSON; '' when it was deleted.",
                                           default=None)
    reason: str = _column("str", "Why, as the person who made it said.", 4096)
    control_id: str = _column("lcstr", "Which control-plane replica shipped it (host:port).", 256)

    def as_json(self) -> dict[str, Any]:
        """The change as one element of a /v1/changes body."""
        return {name: getattr(self, name) for name in CHANGE_COLUMN_NAMES}


CHANGE_COLUMNS: tuple[Column, ...] = tuple(Column(f.name, f.metadata["kind"], f.metadata["doc"])
                                           for f in fields(MeshChange))
CHANGE_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in CHANGE_COLUMNS)
_LIMITS = {f.name: f.metadata["limit"] for f in fields(MeshChange)}
_REQUIRED = ("time", "revision", "who", "kind", "name", "action", "control_id")
_CHOICES = {"action": ACTIONS, "from_mode": ("", *MODES), "to_mode": ("", *MODES)}
_DOCUMENTS = ("before", "after")


class ChangeFormatError(ValueError):
    """The body is not a list of changes we can store (answered with 400 and this message)."""


def change_id(revision: int, time: int, kind: str, name: str) -> str:
    """The collector's id for a change: the same from every replica and every resend of it.

    A digest, not the fields themselves: a name may hold any character, and ids are kept
    one a line (collector/spool.py)."""
    key = json.dumps([revision, time, kind, name]).encode()  # JSON: no separator a name could hold
    return "change-" + hashlib.sha256(key).hexdigest()[:32]


def decode(body: bytes) -> list[dict[str, Any]]:
    """The changes of a body, each a dict of every column (documents as JSON text); ChangeFormatError else."""
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ChangeFormatError("invalid JSON: nested too deeply") from None
    except ChangeFormatError:
        raise
    except ValueError as e:  # UnicodeDecodeError is one too
        raise ChangeFormatError(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"changes"}:
        raise ChangeFormatError('expected a JSON object {"changes": [...]}')
    changes = doc["changes"]
    if not isinstance(changes, list):
        raise ChangeFormatError("changes must be a list")
    if len(changes) > MAX_CHANGES:
        raise ChangeFormatError(f"{len(changes)} changes in one request: at most {MAX_CHANGES}")
    return [_change(i, c) for i, c in enumerate(changes)]


def _no_constant(name: str) -> Any:
    raise ChangeFormatError(f"invalid JSON: {name} is not a number JSON has")


def _change(i: int, change: Any) -> dict[str, Any]:
    where = f"changes[{i}]"
    if not isinstance(change, dict):
        raise ChangeFormatError(f"{where} must be an object")
    unknown = sorted(set(change) - set(CHANGE_COLUMN_NAMES))
    if unknown:
        raise ChangeFormatError(f"{where}: unknown field {unknown[0][:64]!r}")
    for name in _REQUIRED:
        if name not in change:
            raise ChangeFormatError(f"{where}: {name} is required")
    row: dict[str, Any] = {}
    for column in CHANGE_COLUMNS:
        value = change.get(column.name)
        at = f"{where}.{column.name}"
        if column.name in _DOCUMENTS:
            row[column.name] = _document(at, value)
        elif column.kind in ("time", "u64"):
            low, high = (0, 2**63 - 1) if column.kind == "time" else (1, MAX_REVISION)
            if type(value) is not int or not low <= value <= high:  # bool is an int: refused too
                raise ChangeFormatError(f"{at} must be a whole number from {low} to {high}")
            row[column.name] = value
        else:
            row[column.name] = _string(at, "" if value is None and column.name not in _REQUIRED else value,
                                       _LIMITS[column.name], _CHOICES.get(column.name))
    return row


def _string(at: str, value: Any, limit: int, choices: tuple[str, ...] | None) -> str:
    if not isinstance(value, str):
        raise ChangeFormatError(f"{at} must be a string")
    if choices is not None:
        if value not in choices:
            raise ChangeFormatError(f"{at} must be one of {', '.join(repr(c) for c in choices)}")
        return value
    if len(value) > limit:
        raise ChangeFormatError(f"{at} is longer than {limit} characters")
    _utf8(at, value)
    return value


def _document(at: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise ChangeFormatError(f"{at} must be the document (an object) or null")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise ChangeFormatError(f"{at} is nested too deeply") from None
    if len(text) > MAX_DOCUMENT_BYTES or len(_utf8(at, text)) > MAX_DOCUMENT_BYTES:
        raise ChangeFormatError(f"{at} is larger than {MAX_DOCUMENT_BYTES} bytes")
    return text


def _utf8(at: str, text: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (JSON's "\\ud800") cannot be stored."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChangeFormatError(f"{at} holds a lone surrogate, which is not text") from None

"""What the embedded store was inserting when its process died, so a replay is stored once.

The embedded store dies with the collector, in the middle of ClickHouse's own insert. A
plain MergeTree writes a block's deduplication record (`deduplication_logs/`, one
write(2)) *before* it renames the block's part in and commits it (MergeTreeSink:
addPart, then renameTempPartAndAdd, then commit; ClickHouse pull request 110429 says
this order is master's). A `kill -9` between the two leaves a record for a part that
never existed: the replay, under the same token, is dropped as a duplicate and an
acknowledged segment is lost.

So before each insert the store writes down the token, the table and the highest block
number of the table's active parts; when the insert returns, the token goes into the
short list of those stored. After a crash, an insert that never returned is resolved
from the parts themselves: parts with a higher block number are its own (the collector
is the store's only writer, one insert at a time), and their partitions landed; a merge
keeps a part's partition and highest block. The replay then inserts the rows of the
other partitions under a fresh token (the old one may be a dead record), and nothing for
the partitions that landed.

The file is rewritten twice an insert and not fsynced: it has to outlive the process, as
the part files it describes do, not the machine.
"""
from __future__ import annotations

import json
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# Tokens of returned inserts remembered: a replay after a crash is of the oldest segment
# left, whose tables (at most 3) were the last inserts, so a few are enough.
STORED_TOKENS = 16

LEDGER_FILE = "meshlens-inserts.json"


@dataclass
class Replay:
    """An insert that may have been cut short: the partitions known stored; the rest go under a fresh token."""

    landed: set[str] = field(default_factory=set)

    def fresh_token(self, token: str) -> str:
        return f"{token}-replay-{uuid.uuid4().hex[:12]}"


@dataclass
class Pending:
    """The insert in progress as the ledger names it: `token` is the caller's, `used` what ClickHouse was given."""

    token: str
    used: str
    table: str
    after_block: int
    landed: list[str]


class InsertLedger:
    """The embedded store's record of its last inserts, in one small JSON file beside the data."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LEDGER_FILE
        self._stored: deque[str] = deque(maxlen=STORED_TOKENS)
        self._pending: Pending | None = None
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or cut by a crash while being written: no insert had begun
            return
        self._stored.extend(doc.get("stored", []))
        if p := doc.get("inserting"):
            self._pending = Pending(p["token"], p["used"], p["table"], int(p["after_block"]), list(p["landed"]))

    def unfinished(self) -> Pending | None:
        """The insert that began and never returned in the last run, unless its token was stored before."""
        p = self._pending
        return p if p is not None and p.token not in self._stored else None

    def begin(self, token: str, used: str, table: str, after_block: int, landed: set[str]) -> None:
        self._pending = Pending(token, used, table, after_block, sorted(landed))
        self._write()

    def done(self, token: str) -> None:
        self._pending = None
        if token not in self._stored:
            self._stored.append(token)
        self._write()

    def _write(self) -> None:
        doc = {"stored": list(self._stored),
               "inserting": None if self._pending is None else vars(self._pending)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

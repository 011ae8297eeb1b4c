"""What the store holds so far, per observer, read through the collector's query endpoint."""
from __future__ import annotations

import sys
import time
import urllib.parse
import urllib.request
from typing import TextIO

from meshlens.cli.progress import ProgressLine

OBSERVERS: tuple[str, ...] = ("client", "server", "wire", "otlp")
# Without a terminal (CI logs, pipes) one line every this many seconds instead of a line redrawn in place.
LOG_INTERVAL_S = 10.0
TTY_INTERVAL_S = 2.0


def query(url: str, sql: str, timeout: float = 10.0) -> str:
    """One query against a ClickHouse HTTP interface (the collector's endpoint); the body as text."""
    q = urllib.parse.urlencode({"query": sql, "database": "meshlens"})
    with urllib.request.urlopen(f"{url.rstrip('/')}/?{q}", timeout=timeout) as resp:
        return resp.read().decode()


def observer_counts(url: str) -> dict[str, int]:
    """Calls recorded so far, by observer (every observer present, 0 when none)."""
    counts = dict.fromkeys(OBSERVERS, 0)
    for line in query(url, "SELECT toString(observer), count() FROM calls GROUP BY 1 FORMAT TSV").splitlines():
        name, _, n = line.partition("\t")
        counts[name] = int(n)
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v:,}" for k, v in counts.items())


class Progress:
    """One line redrawn in place on a terminal, else a line every LOG_INTERVAL_S."""

    def __init__(self, url: str, duration: float, stream: TextIO | None = None) -> None:
        self.url = url
        self.duration = duration
        self.line = ProgressLine(stream or sys.stdout)
        self.interval = TTY_INTERVAL_S if self.line.tty else LOG_INTERVAL_S
        self._next = 0.0
        self.last: dict[str, int] = {}

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def show(self, elapsed: float, phase: str = "") -> None:
        """`elapsed` seconds of the whole `duration`, in `phase`."""
        self._next = time.monotonic() + self.interval
        try:
            self.last = observer_counts(self.url)
            text = f"calls recorded: {format_counts(self.last)}"
        except OSError as e:
            text = f"calls recorded: (query endpoint not answering: {e})"
        self.line.show(f"[{_clock(elapsed)}/{_clock(self.duration)}{' ' + phase if phase else ''}] {text}")

    def done(self) -> None:
        self.line.done()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"

"""A progress line for long work: redrawn in place on a terminal, else one line each time (logs, pipes)."""
from __future__ import annotations

from typing import TextIO

__all__ = ["ProgressLine"]


class ProgressLine:
    """Writes progress to `stream`; the caller decides when (each has its own pace)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._shown = False

    def show(self, text: str) -> None:
        self.stream.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        """End a line redrawn in place, so that what follows starts on its own line."""
        if self._shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()

"""meshlens/cli/progress.py: redrawn in place on a terminal, a line each time elsewhere."""
from __future__ import annotations

import io

from meshlens.cli.progress import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_each_time():
    out = io.StringIO()
    line = ProgressLine(out)
    line.show("10%")
    line.show("20%")
    line.done()
    assert out.getvalue() == "10%\n20%\n"


def test_a_terminal_gets_one_line_redrawn_then_ended():
    out = Terminal()
    line = ProgressLine(out)
    line.done()  # nothing shown: nothing to end
    line.show("10%")
    line.show("20%")
    line.done()
    assert out.getvalue() == "\r10%\x1b[K\r20%\x1b[K\n"

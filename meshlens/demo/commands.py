"""The `meshlens` commands the demo runs as a user would, each printed with what it printed.

They run as children of the supervisor (so Ctrl-C stops them too), with MESHLENS_STORE and
MESHLENS_CONTROL naming the demo's collector and control plane, which is how the printed
commands read: the same lines work in another terminal while `--keep-running` keeps both up.
"""
from __future__ import annotations

import shlex
from typing import TextIO

from meshlens.demo.supervisor import Finished, Supervisor

__all__ = ["Commands"]

INDENT = "    "


class Commands:
    def __init__(self, sup: Supervisor, out: TextIO, store_url: str, control_url: str) -> None:
        self.sup = sup
        self.out = out
        self.env = {"MESHLENS_STORE": store_url, "MESHLENS_CONTROL": control_url}
        self.count = 0

    def environment(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.env.items())

    def run(self, *args: str, show_stderr: bool = True) -> Finished:
        """`meshlens ARGS`, printed as typed, then its output indented; a refusal's one line is printed too.
        `show_stderr` False: its warnings are left out (they are in its log) unless it failed."""
        self.count += 1
        self.out.write(f"  $ meshlens {shlex.join(args)}\n")
        self.out.flush()
        done = self.sup.run(f"command-{self.count}", ["meshlens.cli.main", "--log-level", "warning", *args],
                            env=self.env)
        lines = done.stdout.splitlines()
        if show_stderr or done.returncode != 0:
            lines += done.stderr.splitlines()
        for line in lines:
            self.out.write(f"{INDENT}{line}\n" if line.strip() else "\n")
        self.out.flush()
        return done

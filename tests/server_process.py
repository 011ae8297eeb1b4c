"""A server subprocess for tests: started until it prints its ready line, stopped with SIGTERM then kill."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.waiting import PATIENCE_S


class ServerProcess:
    """One `meshlens …` server run by a test; subclasses say how to start it and read its ports."""

    name = "server"
    proc: subprocess.Popen | None = None

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.log = self.workdir / f"{self.name}.log"

    def launch(self, args: list[str], ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Run `python -m ARGS`, without MESHLENS_* settings, until a stdout line matches `ready`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
        self._err = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=self._err, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if readable:
                line = self.proc.stdout.readline()
                m = ready.search(line.decode())
                if m:
                    return m
            if self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"{self.name} did not start: {line!r}\n{self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = PATIENCE_S) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()

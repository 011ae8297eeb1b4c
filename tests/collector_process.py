"""Run a real `meshlens collector` subprocess on ephemeral ports, for tests."""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"meshlens collector ready otlp_http=(\S+):(\d+) otlp_grpc=(\S+):(\d+)(?: query=(\S+))?")


class CollectorProcess:
    """`meshlens collector` with its own store, spool and ports; stopped (or killed) by the test."""

    def __init__(self, workdir: Path, store: str | None = None, *args: str, query: bool = True) -> None:
        self.workdir = Path(workdir)
        self.store = store or f"chdb:{self.workdir / 'store'}"
        self.spool_dir = self.workdir / "spool"
        self.args = list(args)
        self.query = query
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.query_url = ""
        self.log = self.workdir / "collector.log"

    def start(self, timeout: float = 60.0) -> "CollectorProcess":
        cmd = [sys.executable, "-m", "meshlens.cli.main", "collector", "--store", self.store,
               "--spool-dir", str(self.spool_dir), "--otlp-http-port", "0", "--otlp-grpc-port", "0",
               "--query-port", "0" if self.query else "-1", "--flush-interval", "0.2", *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, env=env)
        deadline = time.monotonic() + timeout
        line = b""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                m = READY.search(line.decode())
                if m:
                    self.http_port, self.grpc_port = int(m.group(2)), int(m.group(4))
                    self.query_url = m.group(5) or ""
                    return self
            if self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"collector did not start: {line!r}\n{self.log.read_text()[-3000:]}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, timeout: float = 30.0) -> int:
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

    def __enter__(self) -> "CollectorProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()

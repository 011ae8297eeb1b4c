"""A real `meshlens control` subprocess on an ephemeral port, for tests."""
from __future__ import annotations

import re
from pathlib import Path

from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

READY = re.compile(r"meshlens control ready listen=(\S+):(\d+) store=(\S+) revision=(\d+)")


class ControlProcess(ServerProcess):
    name = "control"

    def __init__(self, workdir: Path, port: int = 0, store: str | None = None, *args: str) -> None:
        """`port` 0: any free one; a restart passes the port it had, where its sidecars look for it.
        `store`: its own SQLite file unless given (an etcd:// URL)."""
        super().__init__(workdir)
        self.store = store or f"sqlite:{self.workdir / 'control.db'}"
        self.port = port
        self.args = list(args)
        self.scheme = "https" if "--tls-cert" in args else "http"

    def start(self, timeout: float = PATIENCE_S) -> "ControlProcess":
        ca = [] if any(a in self.args for a in ("--ca-dir", "--ca-cert")) else ["--ca-dir", str(self.workdir / "ca")]
        m = self.launch(["meshlens.cli.main", "control", "--port", str(self.port), "--store", self.store, *ca,
                         *self.args], READY, timeout)
        self.port = int(m.group(2))
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> "ControlProcess":
        return self.start()

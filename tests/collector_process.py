"""Run a real `meshlens collector` subprocess on ephemeral ports, for tests."""
from __future__ import annotations

import re
from pathlib import Path

from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

READY = re.compile(r"meshlens collector ready otlp_http=(\S+):(\d+) otlp_grpc=(\S+):(\d+)(?: query=(\S+))?")


class CollectorProcess(ServerProcess):
    """`meshlens collector` with its own store, spool and ports; stopped (or killed) by the test."""

    name = "collector"

    def __init__(self, workdir: Path, store: str | None = None, *args: str, query: bool = True) -> None:
        super().__init__(workdir)
        self.store = store or f"chdb:{self.workdir / 'store'}"
        self.spool_dir = self.workdir / "spool"
        self.args = list(args)
        self.query = query
        self.http_port = self.grpc_port = 0
        self.query_url = ""

    def start(self, timeout: float = PATIENCE_S) -> "CollectorProcess":
        m = self.launch(["meshlens.cli.main", "collector", "--store", self.store, "--spool-dir", str(self.spool_dir),
                         "--otlp-http-port", "0", "--otlp-grpc-port", "0",
                         "--query-port", "0" if self.query else "-1", "--flush-interval", "0.2", *self.args],
                        READY, timeout)
        self.http_port, self.grpc_port = int(m.group(2)), int(m.group(4))
        self.query_url = m.group(5) or ""
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> "CollectorProcess":
        return self.start()

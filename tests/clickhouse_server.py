"""Debian's clickhouse-server (18.16) run as a test subprocess with its own config, ports and data.

Not a test: `ClickHouseServer` starts and stops one server; `server_fixture()`
makes a pytest fixture that yields a running one (or skips when the binary is
missing). What 18.16 needs in its config, found by trying:
- `<logger>` and `<mark_cache_size>` are required (the server exits with
  "Not found: logger" / "Not found: mark_cache_size" without them);
- a user needs `<networks>` (without it: "User default is not allowed to connect
  from address 127.0.0.1"), a `<profile>` and a `<quota>` that exist;
- preprocessed configs go under `<path>`, so nothing is written to /etc;
- SIGTERM waits for open client connections: an idle HTTP keep-alive one holds
  shutdown for `<keep_alive_timeout>` (10 s by default, 3 here, as Debian ships),
  an open native one until SIGKILL. Close your stores.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import PATIENCE_S

SKIP_REASON = "Debian clickhouse-server not installed: run scripts/install-system.sh"
START_TIMEOUT = PATIENCE_S  # 18.16 answers /ping in ~1 s here; only "it never starts" may expire this
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{dir}/log/server.log</log>
        <errorlog>{dir}/log/error.log</errorlog>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <keep_alive_timeout>3</keep_alive_timeout>
</yandex>
"""

USERS = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


def find_binary() -> str | None:
    """The clickhouse-server executable, also when /usr/sbin is not on PATH."""
    return shutil.which("clickhouse-server") or next(
        (p for p in ("/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClickHouseServer:
    """One clickhouse-server process with everything it writes under `workdir`."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.binary = binary or find_binary()
        if not self.binary:
            raise FileNotFoundError(SKIP_REASON)
        self.tcp_port = 0
        self.http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def native_url(self, database: str) -> str:
        return f"clickhouse://127.0.0.1:{self.tcp_port}/{database}"

    def http_url(self, database: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/?database={database}"

    def start(self, attempts: int = 3) -> None:
        """Start on two free ports; try again if another process took one in between."""
        for attempt in range(attempts):
            self.tcp_port, self.http_port = free_port(), free_port()
            try:
                self._start_once()
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def _start_once(self) -> None:
        for sub in ("data", "tmp", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.xml"
        config.write_text(CONFIG.format(dir=self.workdir, tcp_port=self.tcp_port, http_port=self.http_port))
        (self.workdir / "users.xml").write_text(USERS)
        with open(self.workdir / "log" / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen([self.binary, f"--config-file={config}"], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited with {self._proc.returncode}: {self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.1)
        raise RuntimeError(f"clickhouse-server did not answer /ping in {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ping", timeout=1) as resp:
                return resp.read().strip() == b"Ok."
        except OSError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        text = ""
        for name in ("stdout.log", "error.log"):
            path = self.workdir / "log" / name
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns once the process is gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> ClickHouseServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def server_fixture(scope: str = "session", name: str = "clickhouse_server") -> Callable[..., Any]:
    """A pytest fixture yielding a running ClickHouseServer, or skipping when none is installed."""

    @pytest.fixture(scope=scope, name=name)
    def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
        if not find_binary():
            pytest.skip(SKIP_REASON)
        with ClickHouseServer(tmp_path_factory.mktemp("clickhouse-server")) as server:
            yield server

    return _server

"""A real etcd cluster on loopback for tests: `n` members of Debian's etcd-server, ephemeral ports, own data dirs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.waiting import PATIENCE_S

ETCD = shutil.which("etcd")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    def __init__(self, workdir: Path, members: int = 3) -> None:
        if ETCD is None:
            pytest.skip("etcd-server is not installed (scripts/install-system.sh installs it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * members)
        self.client_ports, self.peer_ports = ports[:members], ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def start(self) -> "EtcdCluster":
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        for name in self.names:
            self._start(name, initial)
        self.wait_healthy()
        return self

    def _start(self, name: str, initial: str) -> None:
        i = self.names.index(name)
        client, peer = self.client_ports[i], self.peer_ports[i]
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([
            ETCD, "--name", name, "--data-dir", str(self.workdir / name),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", "meshlens-test",
            "--heartbeat-interval", "50", "--election-timeout", "500"], stdout=log, stderr=log,
            env={**os.environ, "ETCD_UNSUPPORTED_ARCH": ""})

    def wait_healthy(self, timeout: float = PATIENCE_S) -> None:
        endpoints = ",".join(f"127.0.0.1:{p}" for p, n in zip(self.client_ports, self.names) if n in self.procs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["etcdctl", "--endpoints", endpoints, "endpoint", "health"], capture_output=True,
                                 text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)
            if out.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"etcd cluster not healthy: {out.stderr[-500:]}")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)

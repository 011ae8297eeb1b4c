"""A mesh in network namespaces for the transparent-mode tests: one namespace per service (its app on
:8080, its sidecar as gid 1337, iptables REDIRECT made by `meshlens proxy-iptables`), all on a bridge
in a hub namespace that also runs the collector; everything is removed on close, even after a failure.

    hub   10.200.0.254  bridge, collector (embedded store), the unmeshed client (curl)
    svc1  10.200.0.1    app :8080, sidecar inbound :15006 outbound :15001
    svc2  10.200.0.2    ...
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshlens.proxy.transparent import DEFAULT_PROXY_GID
from tests.collector_process import CollectorProcess
from tests.netns import InNamespace, Namespaces
from tests.proxy.chain_app import ChainApp
from tests.proxy.processes import ProxyProcess
from tests.server_process import ServerProcess
from tests.waiting import PATIENCE_S

HUB_IP = "10.200.0.254"
APP_PORT = 8080
# Inside each namespace the sidecar may use Istio's ports: nothing else listens there.
INBOUND, OUTBOUND, ADMIN, METRICS = 15006, 15001, 15000, 15090


class NsCollector(InNamespace, CollectorProcess):
    pass


class NsProxy(InNamespace, ProxyProcess):
    pass


@dataclass
class Node:
    service: str
    ns: str
    ip: str
    app: ChainApp | None = None
    sidecar: NsProxy | None = None


@dataclass
class MeshNet:
    """The namespaces, processes and addresses of one test's mesh; `close()` undoes all of it."""

    tmp: Path
    namespaces: Namespaces
    hub: str = ""
    collector: NsCollector | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    processes: list[ServerProcess] = field(default_factory=list)

    @property
    def mesh(self) -> dict:
        return {"services": {n.service: {"instances": [f"{n.ip}:{APP_PORT}"]} for n in self.nodes.values()}}

    def start_hub(self) -> None:
        for tool in ("iptables", "curl", "setpriv"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")
        self.hub = self.namespaces.add("hub")
        self.namespaces.bridge(self.hub, "br0", f"{HUB_IP}/24")
        col = NsCollector(self.tmp / "collector", None, "--host", HUB_IP)
        col.netns = self.hub
        self.collector = col
        self.processes.append(col)
        col.start()

    def add_node(self, service: str, index: int) -> Node:
        ns = self.namespaces.add(service)
        ip = f"10.200.0.{index}"
        self.namespaces.attach(ns, self.hub, "br0", f"{ip}/24")
        node = self.nodes[service] = Node(service, ns, ip)
        return node

    def iptables(self, node: Node, *args: str) -> subprocess.CompletedProcess[str]:
        """`meshlens proxy-iptables ARGS` in the node's namespace (the collector's port never redirected)."""
        assert self.collector is not None
        return self.namespaces.run(node.ns, sys.executable, "-m", "meshlens.cli.main", "proxy-iptables", *args,
                                   "--exclude-port", str(self.collector.http_port), check=False)

    def start_node(self, node: Node, next_url: str | None = None, **iptables: str) -> None:
        """The node's app, its sidecar (gid 1337: exempt from the redirect), then the rules."""
        assert self.collector is not None
        app = ChainApp(self.tmp / node.service, node.service, APP_PORT, "0.0.0.0", next_url, netns=node.ns)
        self.processes.append(app)
        node.app = app.start()
        sidecar = NsProxy(self.tmp / f"{node.service}-sidecar", json.dumps(self.mesh), node.service,
                          "--app-port", str(APP_PORT), "--inbound-port", str(INBOUND),
                          "--outbound-port", str(OUTBOUND), "--admin-port", str(ADMIN), "--metrics-port", str(METRICS),
                          "--collector", f"http://{HUB_IP}:{self.collector.http_port}/v1/calls")
        sidecar.netns, sidecar.gid = node.ns, DEFAULT_PROXY_GID
        self.processes.append(sidecar)
        node.sidecar = sidecar.start()
        r = self.iptables(node, "--apply", "--app-port", str(APP_PORT))
        if r.returncode:
            pytest.skip(f"iptables rules cannot be applied in a namespace here: {r.stderr.strip()}")

    def curl(self, ns: str, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        priv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--"] if uid is not None else []
        return self.namespaces.run(ns, *priv, "curl", "-sS", "--max-time", f"{PATIENCE_S:g}", *args, check=False,
                                   timeout=PATIENCE_S + 30)

    def stop_sidecars(self) -> None:
        """SIGTERM every sidecar: they drain and flush their recorders before exiting."""
        for node in self.nodes.values():
            if node.sidecar is not None:
                assert node.sidecar.stop() == 0, node.sidecar.log.read_text()[-2000:]

    def query(self, sql: str) -> list[dict]:
        """Rows from the collector's query endpoint (loopback in the hub namespace) as dicts."""
        assert self.collector is not None
        r = self.namespaces.run(self.hub, "curl", "-sS", "--fail-with-body", "--data-binary",
                                f"{sql} FORMAT JSONEachRow", self.collector.query_url, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def calls(self, count: int, columns: str) -> list[dict]:
        """The calls table once it holds at least `count` rows (or what it holds after PATIENCE_S)."""
        deadline = time.monotonic() + PATIENCE_S
        while True:
            rows = self.query(f"SELECT {columns} FROM meshlens.calls ORDER BY time")
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.3)

    def close(self) -> None:
        for p in reversed(self.processes):
            try:
                p.stop(timeout=15)
            finally:
                p.kill()
        self.namespaces.close()


@contextmanager
def client_and_server(tmp: Path, prefix: str, net_class: type[MeshNet] = MeshNet) -> Iterator[MeshNet]:
    """client (10.200.0.1) and server (10.200.0.2), each with app, sidecar and rules; collector on the hub."""
    with Namespaces(prefix) as namespaces:
        net = net_class(tmp, namespaces)
        try:
            net.start_hub()
            client, server = net.add_node("client", 1), net.add_node("server", 2)
            net.start_node(server)
            net.start_node(client)
            yield net
        finally:
            net.close()

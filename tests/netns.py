"""Network namespaces for tests: make them, wire them (veth pairs, a bridge), run programs in them, and
remove everything they made, even when the test fails.

    with Namespaces("mlx") as ns:           # pytest.skip()s with the reason if namespaces are not permitted
        hub = ns.add("hub")
        ns.bridge(hub, "br0", "10.200.0.254/24")
        a = ns.add("a")
        ns.attach(a, hub, "br0", "10.200.0.1/24")
        ns.run(a, "curl", "-s", "http://10.200.0.254:8080/")

Only the namespaces this object made are deleted; interfaces are created directly inside
them (`ip link add ... netns NS`), so the root namespace never holds one and deleting a
namespace deletes its end of every pair with it.

Run as a module, it starts a program inside a namespace, optionally as another uid/gid, by
exec (the pid stays the same, so a `ServerProcess` can signal it):

    python -m tests.netns NS [--uid U] [--gid G] -- MODULE ARGS...   # = ip netns exec NS python -m MODULE ARGS
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from types import TracebackType

__all__ = ["InNamespace", "Namespaces", "netns_argv"]

# Seconds an `ip` command may take: they are local netlink calls that answer in milliseconds.
IP_TIMEOUT = 30.0


def netns_argv(ns: str, module: str, *args: str, uid: int | None = None, gid: int | None = None) -> list[str]:
    """Arguments for `python -m ...` (as ServerProcess.launch builds it) that run MODULE in `ns`."""
    ids = [*(["--uid", str(uid)] if uid is not None else []), *(["--gid", str(gid)] if gid is not None else [])]
    return ["tests.netns", ns, *ids, "--", module, *args]


class InNamespace:
    """Mixin for a tests.server_process.ServerProcess: `launch` runs it in `netns` as `uid`/`gid`."""

    netns: str | None = None
    uid: int | None = None
    gid: int | None = None

    def launch(self, args: list[str], ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        if self.netns is not None:
            args = netns_argv(self.netns, args[0], *args[1:], uid=self.uid, gid=self.gid)
        return super().launch(args, ready, timeout)  # type: ignore[misc]


class Namespaces:
    """The namespaces one test makes; names get a per-process suffix so parallel runs do not meet."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.suffix = f"{os.getpid() % 100000}"
        self.made: list[str] = []
        self._links = 0

    def __enter__(self) -> "Namespaces":
        import pytest

        if shutil.which("ip") is None:
            pytest.skip("iproute2 (ip) is not installed")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def add(self, name: str) -> str:
        """A new namespace with loopback up; skips the test if namespaces cannot be made here."""
        full = f"{self.prefix}{name}{self.suffix}"
        r = subprocess.run(["ip", "netns", "add", full], capture_output=True, text=True, timeout=IP_TIMEOUT)
        if r.returncode:
            import pytest

            pytest.skip(f"ip netns add is not permitted here (needs root or CAP_SYS_ADMIN/CAP_NET_ADMIN): "
                        f"{r.stderr.strip()}")
        self.made.append(full)
        self.run(full, "ip", "link", "set", "lo", "up")
        return full

    def bridge(self, ns: str, name: str, address: str | None = None) -> None:
        """A bridge in `ns` (the hub the other namespaces attach to), with an address if given."""
        self.run(ns, "ip", "link", "add", name, "type", "bridge")
        if address:
            self.run(ns, "ip", "addr", "add", address, "dev", name)
        self.run(ns, "ip", "link", "set", name, "up")

    def veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair with one end in each namespace, made there directly."""
        sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)

    def attach(self, ns: str, hub: str, bridge: str, address: str, dev: str = "eth0") -> None:
        """Connect `ns` to the bridge in `hub` with a veth pair; `address` (CIDR) goes on `dev` in `ns`."""
        self._links += 1
        port = f"{bridge}p{self._links}"
        self.veth(ns, dev, hub, port)
        self.run(hub, "ip", "link", "set", port, "master", bridge)
        self.run(hub, "ip", "link", "set", port, "up")
        self.run(ns, "ip", "addr", "add", address, "dev", dev)
        self.run(ns, "ip", "link", "set", dev, "up")

    @staticmethod
    def argv(ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = IP_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(*self.argv(ns, *cmd), check=check, timeout=timeout, input=input)

    def close(self) -> None:
        """Delete every namespace made (their veth ends, bridges and rules go with them)."""
        while self.made:
            sh("ip", "netns", "del", self.made.pop(), check=False)


def sh(*cmd: str, check: bool = True, timeout: float = IP_TIMEOUT,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def main() -> None:
    """`python -m tests.netns NS [--uid U] [--gid G] -- MODULE ARGS`: exec MODULE there, as those ids."""
    p = argparse.ArgumentParser(prog="python -m tests.netns")
    p.add_argument("ns")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    priv: list[str] = []
    if a.uid is not None or a.gid is not None:
        priv = ["setpriv", *(["--reuid", str(a.uid)] if a.uid is not None else []),
                *(["--regid", str(a.gid)] if a.gid is not None else []), "--clear-groups", "--"]
    cmd = ["ip", "netns", "exec", a.ns, *priv, sys.executable, "-m", a.module, *a.args]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()

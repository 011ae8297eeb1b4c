"""Transparent interception: where a redirected connection was going, and the iptables rules that redirect.

Istio's recipe, in our own chains of the `nat` table: the application's outgoing TCP
(`OUTPUT`) is `REDIRECT`ed to the outbound listener, except what the sidecar itself
sends (matched by its uid or gid, 1337 by default as in Istio) and loopback
destinations; incoming TCP to the application's port(s) (`PREROUTING`) is redirected
to the inbound listener. The kernel keeps the original destination in conntrack; the
proxy reads it back with `getsockopt(SO_ORIGINAL_DST)` on the accepted socket.

The rules are data (`rules()`: a list of iptables argv lists) so that `--print`, `apply`,
`remove` and the tests read one list. `apply` is idempotent: it creates or flushes only
the MESHLENS_* chains and adds each jump from a built-in chain once; `remove` undoes it.
"""
from __future__ import annotations

import errno
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass

__all__ = ["DEFAULT_PROXY_GID", "DEFAULT_PROXY_UID", "INBOUND_CHAIN", "IPTABLES_TIMEOUT", "IP6T_SO_ORIGINAL_DST", "OUTPUT_CHAIN",
           "IptablesError", "IptablesPlan", "SO_ORIGINAL_DST", "apply", "original_dst", "removal", "remove", "rules"]

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: both options are number 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
# The uid/gid the sidecar runs as, exempt from the outbound redirect: Istio's default (1337),
# so existing pod security settings and people's habits carry over.
DEFAULT_PROXY_UID = 1337
DEFAULT_PROXY_GID = 1337
OUTPUT_CHAIN = "MESHLENS_OUTPUT"
INBOUND_CHAIN = "MESHLENS_INBOUND"
# Built-in chain -> our chain jumped to from it (tcp only: the proxy speaks nothing else).
_JUMPS = (("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN))
# Seconds one iptables invocation may take: it holds the xtables lock, normally for milliseconds.
IPTABLES_TIMEOUT = 30.0


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The (host, port) an iptables-REDIRECTed connection was sent to, or None if it was not redirected.

    Not redirected means: conntrack knows nothing of it (ENOENT), the kernel has no NAT for
    the family (ENOPROTOOPT), or the original destination is this socket's own address
    (the client connected to the listener directly, as in explicit-proxy mode)."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            port, packed = struct.unpack_from("!2xH4s", raw)
        elif sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            port, packed = struct.unpack_from("!2xH4x16s", raw)
        else:
            return None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise
    host = socket.inet_ntop(sock.family, packed)
    local = sock.getsockname()
    if (host, port) == (local[0], local[1]):
        return None
    return host, port


@dataclass(frozen=True)
class IptablesPlan:
    """What to intercept; the CLI validates it. Ports are the sidecar's, as it listens in this namespace."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    app_ports: tuple[int, ...] = ()
    """Incoming TCP to these ports goes to the inbound listener; empty = no inbound redirect."""
    proxy_uid: int | None = DEFAULT_PROXY_UID
    proxy_gid: int | None = DEFAULT_PROXY_GID
    exclude_ports: tuple[int, ...] = ()
    """Destination ports the app's outgoing TCP keeps (ssh, the collector's); inbound only the app ports move."""
    outbound: bool = True


def rules(plan: IptablesPlan) -> list[list[str]]:
    """Every iptables invocation `apply` makes, in order (`-N` tolerates an existing chain; a jump is
    added only when `-C` does not find it)."""
    nat = ["iptables", "-t", "nat"]
    out: list[list[str]] = []
    if plan.outbound:
        out += [[*nat, "-N", OUTPUT_CHAIN], [*nat, "-F", OUTPUT_CHAIN]]
        if plan.proxy_uid is not None:
            out.append([*nat, "-A", OUTPUT_CHAIN, "-m", "owner", "--uid-owner", str(plan.proxy_uid), "-j", "RETURN"])
        if plan.proxy_gid is not None:
            out.append([*nat, "-A", OUTPUT_CHAIN, "-m", "owner", "--gid-owner", str(plan.proxy_gid), "-j", "RETURN"])
        # loopback: the app's own explicit-proxy calls, the sidecar's admin, local services; redirecting
        # them would send the outbound listener its own connections
        out.append([*nat, "-A", OUTPUT_CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"])
        out += [[*nat, "-A", OUTPUT_CHAIN, "-p", "tcp", "--dport", str(p), "-j", "RETURN"] for p in plan.exclude_ports]
        out.append([*nat, "-A", OUTPUT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(plan.outbound_port)])
    if plan.app_ports:
        out += [[*nat, "-N", INBOUND_CHAIN], [*nat, "-F", INBOUND_CHAIN]]
        out += [[*nat, "-A", INBOUND_CHAIN, "-p", "tcp", "--dport", str(p), "-j", "REDIRECT",
                 "--to-ports", str(plan.inbound_port)] for p in plan.app_ports]
    for builtin, chain in _JUMPS:
        if (chain == OUTPUT_CHAIN and plan.outbound) or (chain == INBOUND_CHAIN and plan.app_ports):
            out.append([*nat, "-A", builtin, "-p", "tcp", "-j", chain])
    return out


def removal() -> list[list[str]]:
    """Every iptables invocation `remove` makes (each may fail harmlessly: nothing to remove)."""
    nat = ["iptables", "-t", "nat"]
    out = [[*nat, "-D", builtin, "-p", "tcp", "-j", chain] for builtin, chain in _JUMPS]
    for _, chain in _JUMPS:
        out += [[*nat, "-F", chain], [*nat, "-X", chain]]
    return out


class IptablesError(RuntimeError):
    """iptables is missing, not permitted, or refused a rule; the message is one line for the user."""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise IptablesError(f"{argv[0]} is not installed (Debian: apt-get install iptables)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{' '.join(argv)}: no answer within {IPTABLES_TIMEOUT:g}s (xtables lock held?)") from None


def _denied(text: str) -> bool:
    """iptables' words for a missing CAP_NET_ADMIN (legacy and nf_tables backends differ)."""
    return "ermission denied" in text or "not permitted" in text or "must be root" in text


def _fail(argv: list[str], r: subprocess.CompletedProcess[str]) -> IptablesError:
    text = (r.stderr or r.stdout).strip().splitlines()
    first = text[0] if text else f"exit status {r.returncode}"
    if _denied(first):
        return IptablesError(f"iptables is not permitted here (needs root or CAP_NET_ADMIN): {first}")
    return IptablesError(f"{' '.join(argv)}: {first}")


def apply(plan: IptablesPlan) -> list[list[str]]:
    """Install the rules (idempotent: our chains are recreated, jumps added once); returns what ran."""
    ran: list[list[str]] = []
    for argv in rules(plan):  # argv[3] is the iptables command: -N, -F, -A
        if argv[3] == "-N":
            r = _run(argv)
            if r.returncode and "exist" not in r.stderr:
                raise _fail(argv, r)
            ran.append(argv)
            continue
        if argv[3] == "-A" and argv[4] in ("OUTPUT", "PREROUTING"):
            check = [*argv[:3], "-C", *argv[4:]]
            if _run(check).returncode == 0:
                continue
        r = _run(argv)
        if r.returncode:
            raise _fail(argv, r)
        ran.append(argv)
    if not plan.outbound or not plan.app_ports:  # a plan without one side leaves no stale chain behind
        for argv in removal():
            chain = argv[-1]
            if (chain == OUTPUT_CHAIN and not plan.outbound) or (chain == INBOUND_CHAIN and not plan.app_ports):
                r = _run(argv)
                if r.returncode and _denied(r.stderr):
                    raise _fail(argv, r)
    return ran


def remove() -> list[list[str]]:
    """Undo `apply`: drop our jumps (every copy), flush and delete our chains; missing ones are fine."""
    ran: list[list[str]] = []
    for argv in removal():
        while True:
            r = _run(argv)
            if r.returncode:
                if _denied(r.stderr):
                    raise _fail(argv, r)
                break
            ran.append(argv)
            if argv[3] != "-D":
                break
    return ran

"""Before a server starts: are its ports free? One line naming the flag, instead of each library's wording.

asyncio names the address as a Python tuple, aiohttp's site the same, and gRPC raises a RuntimeError after
logging a line of its own from C. Binding each port once first (as the servers will: SO_REUSEADDR) turns
the likely failures into one line that names the flag to change. A port taken between the check and
the real bind still fails, with the library's message.
"""
from __future__ import annotations

import errno
import socket

from meshlens.cli.errors import UserError

__all__ = ["check_ports", "listen_failure"]


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise UserError if any of `ports` ({flag: port}, 0 = any, < 0 = off) cannot be bound on `host`."""
    for flag, port in ports.items():
        if port < 0:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UserError(f"cannot listen on {host!r}: not an address of this machine "
                            f"({_lower(e.strerror or str(e))})") from None
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise UserError(f"cannot listen on {_hostport(host, port)} ({flag}): {_reason(e, host)}") from None


def listen_failure(e: OSError) -> str:
    """A bind that failed anyway (taken since the check): the OS's reason in words."""
    return f"cannot listen: {_reason(e, '')}"


def _reason(e: OSError, host: str) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there; pick another port, or 0 for any)"
    if e.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{host or 'the address'} is not an address of this machine"
    return _lower(e.strerror or str(e))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]

"""Errors shared by the protocol cores: whose fault it is, and the HTTP status it maps to.

Catch these at the boundary only (the proxy's `asyncio.Protocol`, the tap's
connection loop); everywhere else use built-in exceptions.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ProtocolError", "PeerError", "LocalError"]


class ProtocolError(Exception):
    """Base of every error a protocol core raises on purpose."""

    status: int
    events: list[Any]
    """Events the core produced in the same call before it raised (the caller still acts on them)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.events = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, status={self.status})"


class PeerError(ProtocolError):
    """The peer broke the protocol: answer `status` (400, 431, 502, ...) and close."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message, status=status)


class LocalError(ProtocolError):
    """We broke the protocol (the caller drove a core wrongly): a bug, log it loudly."""

    def __init__(self, message: str, *, status: int = 500) -> None:
        super().__init__(message, status=status)

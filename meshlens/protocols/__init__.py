"""I/O-free protocol cores shared by the proxy and the tap: bytes in, events out.

- `sniff`: which protocol a connection speaks, from its first bytes;
- `tls`: ClientHello / ServerHello (SNI, versions, ALPN);
- `http1`: HTTP/1.1 exchange tracking for one connection, both directions;
- `errors`: `PeerError` (the peer's fault, with the HTTP status) and `LocalError` (ours).
"""
from __future__ import annotations

from meshlens.protocols.errors import LocalError, PeerError, ProtocolError

__all__ = ["LocalError", "PeerError", "ProtocolError"]

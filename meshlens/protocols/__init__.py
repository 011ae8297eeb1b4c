"""I/O-free protocol cores shared by the proxy and the tap: bytes in, events out.

- `sniff`: which protocol a connection speaks, from its first bytes;
- `tls`: ClientHello / ServerHello (SNI, versions, ALPN);
- `http1`: the HTTP/1.1 codec, a reader per direction (the proxy drives it);
- `http1_tracker`: the two readers paired into `Exchange` records, with gap recovery (the tap);
- `trace_context`: the W3C `traceparent` parser;
- `errors`: `PeerError` (the peer's fault, with the HTTP status) and `LocalError` (ours).
"""
from __future__ import annotations

from meshlens.protocols.errors import LocalError, PeerError, ProtocolError

__all__ = ["LocalError", "PeerError", "ProtocolError"]

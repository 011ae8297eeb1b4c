"""What the sidecar knows of a connection's TLS and of the peer at its other end.

Today the sidecar terminates no TLS: a TLS connection it is given passes through as a
tunnel, and `TlsWatch` reads both hellos as the bytes go by (SNI, ALPN, versions:
meshlens.protocols.tls; nothing is decrypted), for the call's `tls`, `authority` and
attributes, as the tap names them. Mutual TLS brings the rest here: the SSL contexts
the shells and proxy/connect.py use, and the verified peer identity (SPIFFE) a call
records in `peer_identity` and authorization decides on.
"""
from __future__ import annotations

from typing import Any

from meshlens.collector.record import AT
from meshlens.protocols.errors import PeerError
from meshlens.protocols.tls import ClientHello, HelloParser, ServerHello, hello_attributes

__all__ = ["TlsWatch"]


class TlsWatch:
    """Both hellos of a TLS connection, read from the bytes as they pass through."""

    __slots__ = ("parsers", "client_hello", "server_hello", "error")

    def __init__(self) -> None:
        self.parsers: list[HelloParser | None] = [HelloParser("client"), HelloParser("server")]
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.error = ""

    def client_bytes(self, data: bytes) -> bool:
        return self._feed(0, data)

    def server_bytes(self, data: bytes) -> bool:
        return self._feed(1, data)

    def _feed(self, i: int, data: bytes) -> bool:
        """True once this direction needs no more bytes."""
        parser = self.parsers[i]
        if parser is None:
            return True
        try:
            hello = parser.feed(data)
        except PeerError as e:  # not ours to judge: the bytes still pass, the record says why it has no SNI
            self.error = self.error or str(e)
            self.parsers[i] = None
            return True
        if hello is None:
            return False
        if isinstance(hello, ClientHello):
            self.client_hello = hello
        else:
            self.server_hello = hello
            if hello.hello_retry:  # RFC 8446 4.1.4: the real ServerHello follows the client's second hello
                self.parsers[i] = HelloParser("server")
                return False
        self.parsers[i] = None
        return True

    def fill(self, row: list[Any]) -> None:
        """A call row's tls, authority and attributes, as the tap names them."""
        row[AT.tls] = True
        if self.client_hello is not None:
            row[AT.authority] = self.client_hello.sni or ""
        row[AT.attributes].update(hello_attributes(self.client_hello, self.server_hello, self.error))

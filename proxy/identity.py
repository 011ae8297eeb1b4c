"""What the sidecar knows of TLS: its own identity, and a connection's TLS and the peer at its other end.

`Workload` is this sidecar's identity: a key made here at start (ECDSA P-256; it never
leaves the process, and never touches a disk: the SSL contexts read it from an anonymous
memory file), the certificate chain the control plane's CA issued for it
(control/ca.py: the SPIFFE id of its service, 24 h), the trust bundle, and the SSL
contexts built from them for mutual TLS, which are swapped whole when the certificate
is renewed (proxy/control.py `IdentityWatch`), so a connection keeps the context it
started with.

`TlsWatch`: a TLS connection the sidecar does not terminate passes through as a tunnel,
and both hellos are read as the bytes go by (SNI, ALPN, versions: meshlens.protocols.tls;
nothing is decrypted), for the call's `tls`, `authority` and attributes, as the tap names them.
"""
from __future__ import annotations

import datetime as dt
import os
import random
import ssl
from contextlib import ExitStack
from typing import Any

from meshlens.collector.record import AT
from meshlens.policy.trust import bundle_fingerprints
from meshlens.protocols.errors import PeerError
from meshlens.protocols.tls import ClientHello, HelloParser, ServerHello, hello_attributes
from meshlens.proxy.mtls import MESH_ALPN

__all__ = ["RENEW_AT", "TlsWatch", "Workload"]

# Renewal at half the certificate's life, +-10 % of it (Istio's SECRET_GRACE_PERIOD_RATIO is 0.5, with jitter).
RENEW_AT, RENEW_JITTER = 0.5, 0.1


class Workload:
    """This sidecar's own key, certificate chain, trust bundle and the mTLS contexts made of them."""

    def __init__(self) -> None:
        self.key: Any = None
        """The key of the certificate installed (a new one is made for each request: `csr`)."""
        self.identity = ""
        """The SPIFFE id its certificate carries ('' before the first is installed)."""
        self.installed_at: dt.datetime | None = None
        """When the certificate in hand was installed (its life, for renewal, counts from here: a CA backdates)."""
        self.not_after: dt.datetime | None = None
        self.expires_at = 0.0
        """`not_after` as a Unix time: from then on no mTLS is originated with it (peers would refuse it)."""
        self.server: ssl.SSLContext | None = None
        """Inbound mTLS: its chain, peers' chains checked against the bundle (a client certificate required)."""
        self.client: ssl.SSLContext | None = None
        """Outbound mTLS: its chain, the server's checked against the bundle (its SPIFFE id checked by the caller)."""
        self.root = ""
        """The fingerprint of the root its certificate chains to (control/ca.py `fingerprint`)."""
        self.bundle = ""
        """The trust bundle in force (PEM)."""
        self.trusts: tuple[str, ...] = ()
        """The fingerprints of the roots in it."""
        self._chain = self._key_pem = b""

    def __repr__(self) -> str:
        return f"<Workload {self.identity or '-'} until {self.not_after}>"

    @property
    def trust_domain(self) -> str:
        return self.identity[len("spiffe://"):].split("/", 1)[0] if self.identity else ""

    def identity_of(self, namespace: str, service_account: str) -> str:
        """The SPIFFE id a peer serving under this namespace and account must show (this trust domain's)."""
        return f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"

    @staticmethod
    def csr() -> tuple[bytes, Any]:
        """A new key and a certificate signing request for it, naming nothing (the CA gives the identity the token
        allows): each renewal rotates the key too, as Istio's agent does."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        req = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
        return req.public_bytes(serialization.Encoding.PEM), key

    def install(self, identity: str, chain_pem: str, bundle_pem: str, key: Any, root: str) -> None:
        """A certificate the CA issued for `key` (from `csr`), chaining to the root `root` names; ValueError
        (nothing changed) when it is not for that key and identity."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            chain = x509.load_pem_x509_certificates(chain_pem.encode())
        except ValueError as e:
            raise ValueError(f"the issued certificate does not parse: {e}") from None
        trusts = bundle_fingerprints(bundle_pem)
        leaf = chain[0]
        if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the issued certificate is not for this sidecar's key")
        try:
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [identity]:
            raise ValueError(f"the issued certificate names {', '.join(uris) or 'nothing'}, not {identity}")
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        server, client = _contexts(chain_pem.encode(), key_pem, bundle_pem)
        self.key, self.identity, self.server, self.client = key, identity, server, client
        self.root, self.bundle, self.trusts = root, bundle_pem, trusts
        self._chain, self._key_pem = chain_pem.encode(), key_pem
        self.installed_at, self.not_after = dt.datetime.now(dt.timezone.utc), leaf.not_valid_after_utc
        self.expires_at = self.not_after.timestamp()
        self._renew_share = RENEW_AT + random.uniform(-1, 1) * RENEW_JITTER  # drawn once a certificate

    _renew_share = RENEW_AT

    def retrust(self, bundle_pem: str) -> None:
        """The same certificate with another trust bundle (a root rotation's step): new contexts for new connections;
        ValueError (nothing changed) when it does not load."""
        trusts = bundle_fingerprints(bundle_pem)
        try:
            server, client = _contexts(self._chain, self._key_pem, bundle_pem)
        except ssl.SSLError as e:
            raise ValueError(f"the trust bundle does not load: {e}") from None
        self.server, self.client, self.bundle, self.trusts = server, client, bundle_pem, trusts

    def renew_in(self, now: dt.datetime) -> float:
        """Seconds from `now` to its renewal: at half its life, with jitter (0 when due or when there is none)."""
        if self.installed_at is None or self.not_after is None:
            return 0.0
        life = (self.not_after - self.installed_at).total_seconds()
        at = self.installed_at + dt.timedelta(seconds=life * self._renew_share)
        return max(0.0, (at - now).total_seconds())


def _contexts(chain: bytes, key: bytes, bundle: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client SSL contexts, the key and chain read from anonymous memory files (never a disk)."""
    with ExitStack() as stack:
        paths = []
        for name, data in (("chain", chain), ("key", key)):
            fd = os.memfd_create(f"meshlens-{name}", os.MFD_CLOEXEC)
            stack.callback(os.close, fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        out = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(paths[0], paths[1])
            ctx.load_verify_locations(cadata=bundle)
            ctx.check_hostname = False  # the peer is named by its SPIFFE id, which the caller checks
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.set_alpn_protocols(list(MESH_ALPN))  # what marks mesh traffic (proxy/mtls.py)
            if purpose == ssl.PROTOCOL_TLS_SERVER:
                ctx.num_tickets = 1  # a client keeps one session an address (proxy/mtls.py): OpenSSL's 2nd ticket is waste
            out.append(ctx)
        return out[0], out[1]


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

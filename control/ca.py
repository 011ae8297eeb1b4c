"""The mesh's certificate authority: each workload's identity, as a SPIFFE id in a short-lived certificate.

A sidecar makes its own key (it never leaves the sidecar), sends a certificate signing
request naming its identity, and gets back its certificate, the chain to the root, and
the trust bundle (every root its peers may be signed by). The identity is Istio's:
`spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (the namespace and service
account from the mesh definition, defaulting to `default` and the service's name), as the
certificate's one URI subject alternative name, critical, with an empty subject
(istio/security/pkg/pki/util/generate_cert.go does the same). Certificates live
WORKLOAD_LIFETIME (Istio's default 24 h) and are renewed by the sidecar at half their life.

The signing certificate and key: the user's own root or intermediate (`--ca-cert FILE`,
the signing certificate followed by its chain up to the root; `--ca-key FILE`), else a
root generated at the control plane's first start and kept in its data directory
(`root-cert.pem`, and `root-key.pem` readable by its owner only). Keys are ECDSA P-256.
Several control-plane replicas (etcd) must be given the same files.

A request is refused, in one line, when it is not a PEM CSR, its signature does not
verify, its key is not ECDSA P-256, it names another identity than the one its token
allows, or it is larger than MAX_CSR_BYTES.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["MAX_CSR_BYTES", "ROOT_LIFETIME", "TRUST_DOMAIN", "WORKLOAD_LIFETIME", "CA", "CAError", "Issued",
           "spiffe_id"]

log = logging.getLogger("meshlens.control.ca")

TRUST_DOMAIN = "cluster.local"  # Istio's default trust domain
WORKLOAD_LIFETIME = dt.timedelta(hours=24)  # Istio's DEFAULT_WORKLOAD_CERT_TTL
ROOT_LIFETIME = dt.timedelta(days=3650)  # Istio's self-signed root: 10 years
# Clock skew between the CA and the peers that check a new certificate (Istio backdates by a minute or so).
BACKDATE = dt.timedelta(minutes=5)
# A P-256 CSR is under 1 KiB; this leaves room for a long identity and refuses anything else.
MAX_CSR_BYTES = 16 * 1024


class CAError(ValueError):
    """A request or a CA file that cannot be used; one line, naming why."""


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Issued:
    identity: str
    certificate_chain: str
    """PEM: the workload's certificate, then the chain up to (not including) the root."""
    trust_bundle: str
    """PEM: the roots a peer's chain may end in."""
    not_after: dt.datetime


class CA:
    """One signing certificate and its key, with the chain above it and the trust bundle."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate],
                 roots: list[x509.Certificate], trust_domain: str = TRUST_DOMAIN,
                 lifetime: dt.timedelta = WORKLOAD_LIFETIME) -> None:
        self.cert, self.key, self.chain, self.roots = cert, key, chain, roots
        self.trust_domain = trust_domain
        self.lifetime = lifetime
        """Of the workload certificates it issues (`meshlens control --cert-lifetime`)."""

    def __repr__(self) -> str:
        return f"<CA {self.cert.subject.rfc4514_string()} trust_domain={self.trust_domain}>"

    # -- where it comes from ----------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, trust_domain: str = TRUST_DOMAIN, cert_file: str | None = None,
             key_file: str | None = None, lifetime: dt.timedelta = WORKLOAD_LIFETIME) -> CA:
        """The user's files when given, else the root kept in `directory` (generated there at first start)."""
        if bool(cert_file) != bool(key_file):
            raise CAError("--ca-cert and --ca-key go together: the signing certificate and its key")
        if cert_file and key_file:
            return cls._from_files(Path(cert_file), Path(key_file), trust_domain, lifetime)
        cert_path, key_path = directory / "root-cert.pem", directory / "root-key.pem"
        if not cert_path.exists() or not key_path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / ".lock", "w") as lock:  # two control planes starting at once make one root
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not cert_path.exists() and not key_path.exists():
                    cls._generate(cert_path, key_path, trust_domain)
        return cls._from_files(cert_path, key_path, trust_domain, lifetime)

    @classmethod
    def _from_files(cls, cert_path: Path, key_path: Path, trust_domain: str, lifetime: dt.timedelta) -> CA:
        try:
            certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise CAError(f"{cert_path}: not a PEM certificate ({getattr(e, 'strerror', None) or e})") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise CAError(f"{key_path}: not an unencrypted PEM private key ({getattr(e, 'strerror', None) or e})") \
                from None
        signing = certs[0]
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CAError(f"{key_path}: the CA key must be ECDSA P-256")
        if key.public_key().public_numbers() != signing.public_key().public_numbers():  # type: ignore[union-attr]
            raise CAError(f"{key_path} is not the key of {cert_path}'s first certificate")
        try:
            basic = signing.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise CAError(f"{cert_path}: its first certificate is not a CA certificate (basicConstraints CA:TRUE)")
        now = dt.datetime.now(dt.timezone.utc)
        if not signing.not_valid_before_utc <= now < signing.not_valid_after_utc:
            raise CAError(f"{cert_path}: the CA certificate is valid from {signing.not_valid_before_utc:%Y-%m-%d %H:%M} "
                          f"to {signing.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now")
        root = certs[-1]
        if root.issuer != root.subject:
            raise CAError(f"{cert_path}: the chain must end in its self-signed root")
        return cls(signing, key, certs[1:-1] if len(certs) > 1 else [], [root], trust_domain, lifetime)

    @staticmethod
    def _generate(cert_path: Path, key_path: Path, trust_domain: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlens"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"meshlens root CA {trust_domain}")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
                .not_valid_after(now + ROOT_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log.info("generated the mesh's root CA cert=%s trust_domain=%s", cert_path, trust_domain)

    # -- what it does -----------------------------------------------------------------------------

    def bundle(self) -> str:
        return "".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in self.roots)

    def identity(self, namespace: str, service_account: str) -> str:
        return spiffe_id(self.trust_domain, namespace, service_account)

    def sign(self, csr_pem: bytes, identity: str, now: dt.datetime | None = None,
             lifetime: dt.timedelta | None = None) -> Issued:
        """A workload certificate for `identity` (the one its token allows) from a CSR; CAError when refused."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise CAError(f"the certificate request is larger than MAX_CSR_BYTES={MAX_CSR_BYTES}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CAError("not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)") from None
        try:
            valid = csr.is_signature_valid
        except (InvalidSignature, ValueError):
            valid = False
        if not valid:
            raise CAError("the certificate request's signature does not verify with its own key")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise CAError("workload keys are ECDSA P-256")
        try:
            asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            asked = None
        except ValueError:
            raise CAError("the certificate request's extensions do not parse") from None
        if asked is not None:
            names = [str(n.value) for n in asked]
            if names != [identity] or asked.get_values_for_type(x509.UniformResourceIdentifier) != [identity]:
                raise CAError(f"the request names {', '.join(names) or 'nothing'}; this token may have {identity} only")
        now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)  # certificates keep seconds
        not_after = min(now + (lifetime or self.lifetime), self.cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = [cert, *([self.cert] if self.cert not in self.roots else []), *self.chain]
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
        return Issued(identity, pem, self.bundle(), not_after)

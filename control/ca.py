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

Rotating the root, without a failed request, in Linkerd's three steps (`meshlens ca rotate`,
control/api.py; each step is written to the store as the `TrustBundle`, so every sidecar
gets it with its next snapshot, and the history says who rotated when):

- `begin`: a new root is made (`next-root-cert.pem`, `next-root-key.pem`) and trusted beside
  the old one; certificates are still signed by the old one.
- `switch`: once every sidecar trusts the new root, it signs; the old one is kept trusted
  (`previous-root-cert.pem`; its key is deleted) and sidecars renew at once.
- `finish`: once every sidecar holds a certificate from the new root, the old is dropped.

A step cut midway (a crash between two renames) is completed at the next start. With the
user's own files the same steps are restarts: `--ca-trust` the new root, then sign with
it and `--ca-trust` the old, then drop `--ca-trust`.

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

from meshlens.policy.trust import fingerprint

__all__ = ["MAX_CSR_BYTES", "ROOT_LIFETIME", "ROTATION_STEPS", "TRUST_DOMAIN", "WORKLOAD_LIFETIME", "CA", "CAError",
           "Issued", "spiffe_id"]

log = logging.getLogger("meshlens.control.ca")

TRUST_DOMAIN = "cluster.local"  # Istio's default trust domain
WORKLOAD_LIFETIME = dt.timedelta(hours=24)  # Istio's DEFAULT_WORKLOAD_CERT_TTL
ROOT_LIFETIME = dt.timedelta(days=3650)  # Istio's self-signed root: 10 years
# Clock skew between the CA and the peers that check a new certificate (Istio backdates by a minute or so).
BACKDATE = dt.timedelta(minutes=5)
# A P-256 CSR is under 1 KiB; this leaves room for a long identity and refuses anything else.
MAX_CSR_BYTES = 16 * 1024
ROTATION_STEPS = ("begin", "switch", "finish")
# The generated root's files, in its directory.
ROOT, ROOT_KEY, NEXT, NEXT_KEY, PREVIOUS = ("root-cert.pem", "root-key.pem", "next-root-cert.pem",
                                            "next-root-key.pem", "previous-root-cert.pem")


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
    root: str
    """The fingerprint of the root the certificate chains to."""


class CA:
    """One signing certificate and its key, with the chain above it and the trust bundle."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate],
                 roots: list[x509.Certificate], trust_domain: str = TRUST_DOMAIN,
                 lifetime: dt.timedelta = WORKLOAD_LIFETIME, directory: Path | None = None) -> None:
        self.cert, self.key, self.chain = cert, key, chain
        self.roots = roots
        """The trust bundle: first the root the signing certificate chains to, then any other trusted."""
        self.trust_domain = trust_domain
        self.lifetime = lifetime
        """Of the workload certificates it issues (`meshlens control --cert-lifetime`)."""
        self.directory = directory
        """Where the generated root is kept (None: the user's files, whose rotation is theirs)."""

    def __repr__(self) -> str:
        return f"<CA {self.cert.subject.rfc4514_string()} trust_domain={self.trust_domain}>"

    # -- where it comes from ----------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, trust_domain: str = TRUST_DOMAIN, cert_file: str | None = None,
             key_file: str | None = None, lifetime: dt.timedelta = WORKLOAD_LIFETIME,
             trust_file: str | None = None) -> CA:
        """The user's files when given (`trust_file`: more roots to trust, for their rotation), else the root kept
        in `directory` (generated there at first start), with a rotation's other root."""
        if bool(cert_file) != bool(key_file):
            raise CAError("--ca-cert and --ca-key go together: the signing certificate and its key")
        if cert_file and key_file:
            extra = _certificates(Path(trust_file), "--ca-trust") if trust_file else []
            return cls._from_files(Path(cert_file), Path(key_file), trust_domain, lifetime, extra)
        if trust_file:
            raise CAError("--ca-trust goes with --ca-cert (the generated root rotates with `meshlens ca rotate`)")
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):  # two control planes starting at once make one root
            _complete_switch(directory)
            if not (directory / ROOT).exists() and not (directory / ROOT_KEY).exists():
                cls._generate(directory / ROOT, directory / ROOT_KEY, trust_domain)
            extra = [_certificates(directory / name, name)[0] for name in (NEXT, PREVIOUS) if (directory / name).exists()]
        ca = cls._from_files(directory / ROOT, directory / ROOT_KEY, trust_domain, lifetime, extra)
        ca.directory = directory
        return ca

    @property
    def rotation(self) -> str:
        """Where a rotation of the generated root stands: none, begun (a next root trusted), switched (the previous
        root still trusted)."""
        d = self.directory
        if d is None:
            return "none"
        return "begun" if (d / NEXT).exists() else "switched" if (d / PREVIOUS).exists() else "none"

    def rotate(self, step: str) -> None:
        """One step of a root rotation (the module's docstring); CAError when it is not the step that comes next."""
        d = self.directory
        if d is None:
            raise CAError("this CA is your own files (--ca-cert): rotate its root by restarting the control plane, "
                          "first with --ca-trust NEW-ROOT, then signing with the new one and --ca-trust OLD-ROOT, "
                          "then without --ca-trust")
        expected = {"none": "begin", "begun": "switch", "switched": "finish"}[self.rotation]
        if step != expected:
            raise CAError(f"the rotation is {self.rotation}: the next step is {expected}, not {step}")
        with _locked(d):
            if step == "begin":
                self._generate(d / NEXT, d / NEXT_KEY, self.trust_domain)
            elif step == "switch":
                _write(d / PREVIOUS, (d / ROOT).read_bytes())  # first: a cut switch is completed from here
                _complete_switch(d)
            else:
                (d / PREVIOUS).unlink()
        fresh = CA.open(d, self.trust_domain, lifetime=self.lifetime)
        self.cert, self.key, self.chain, self.roots = fresh.cert, fresh.key, fresh.chain, fresh.roots
        log.info("root rotation step=%s signer=%s roots=%s", step, fingerprint(self.roots[0])[:16],
                 ",".join(fingerprint(r)[:16] for r in self.roots))

    @classmethod
    def _from_files(cls, cert_path: Path, key_path: Path, trust_domain: str, lifetime: dt.timedelta,
                    extra_roots: list[x509.Certificate] | None = None) -> CA:
        certs = _certificates(cert_path, str(cert_path))
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
        roots = [root, *(r for r in extra_roots or () if r != root)]
        for r in roots[1:]:
            if r.issuer != r.subject:
                raise CAError(f"{r.subject.rfc4514_string()}: a trusted root must be self-signed")
        return cls(signing, key, certs[1:-1] if len(certs) > 1 else [], roots, trust_domain, lifetime)

    @staticmethod
    def _generate(cert_path: Path, key_path: Path, trust_domain: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        serial = x509.random_serial_number()
        # Named by when it was made and its serial: a rotation's two roots are told apart in chains, logs and
        # `meshlens ca status`.
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlens"),
                          x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain[:64]),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"meshlens root CA {now:%Y-%m-%d} {serial % 16 ** 8:08x}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(serial).not_valid_before(now - BACKDATE)
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
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
            names = [str(n.value).encode("unicode_escape").decode() for n in asked]  # one line, whatever it holds
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
        return Issued(identity, pem, self.bundle(), not_after, fingerprint(self.roots[0]))

    def trust(self) -> dict[str, object]:
        """What sidecars are told of the trust (the store's TrustBundle): every root, and the one that signs now."""
        return {"roots": [r.public_bytes(serialization.Encoding.PEM).decode() for r in self.roots],
                "signer": fingerprint(self.roots[0]), "rotation": self.rotation}


def _certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CAError(f"{what}: not a PEM certificate ({getattr(e, 'strerror', None) or e})") from None


class _locked:
    """The CA directory's lock: one control plane at a time makes or rotates its root."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"

    def __enter__(self) -> None:
        self._file = open(self.path, "w")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _complete_switch(d: Path) -> None:
    """The switch's renames (the next root's key, then its certificate, over the root's), or what a crash left of
    them; a begin cut before its certificate was written is undone."""
    if (d / NEXT_KEY).exists() and not (d / NEXT).exists():
        (d / NEXT_KEY).unlink()  # a begin cut short: its key alone
        return
    if not (d / PREVIOUS).exists():
        return  # no switch under way
    if (d / NEXT_KEY).exists():
        os.replace(d / NEXT_KEY, d / ROOT_KEY)
    if (d / NEXT).exists():
        os.replace(d / NEXT, d / ROOT)

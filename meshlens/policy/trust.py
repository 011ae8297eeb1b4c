"""The mesh's trust as the control plane and its sidecars share it: roots named by fingerprint, and the
`TrustBundle` spec every snapshot carries (control/rotation.py writes it, proxy/control.py applies it).

    spec:
      roots: [PEM, ...]      # every root a peer's certificate may chain to; the signer's first
      signer: FINGERPRINT    # the root new workload certificates chain to
      rotation: none | begun | switched
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["MAX_ROOTS", "Trust", "bundle_fingerprints", "fingerprint", "read_trust"]

# A bundle holds the root, a rotation's other one, and the user's extra roots: more is not a bundle.
MAX_ROOTS = 8


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, in hex: how roots are named between the control plane and sidecars."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def bundle_fingerprints(pem: str) -> tuple[str, ...]:
    """The fingerprints of a PEM bundle's certificates; ValueError when it holds none or does not parse."""
    try:
        roots = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        raise ValueError(f"the trust bundle does not parse: {e}") from None
    return tuple(fingerprint(r) for r in roots)


@dataclass(frozen=True)
class Trust:
    bundle: str
    """The roots, as one PEM text."""
    signer: str
    roots: tuple[str, ...]
    """Their fingerprints."""


def read_trust(spec: Any, where: str) -> Trust:
    """A TrustBundle spec, checked; ValueError naming what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("roots"), list) or not isinstance(spec.get("signer"), str):
        raise ValueError(f"{where}: trust must be a mapping with roots (a list of PEM) and signer (a fingerprint)")
    if not 1 <= len(spec["roots"]) <= MAX_ROOTS or not all(isinstance(r, str) for r in spec["roots"]):
        raise ValueError(f"{where}: trust.roots must be 1 to {MAX_ROOTS} PEM certificates")
    bundle = "".join(spec["roots"])
    roots = bundle_fingerprints(bundle)
    if spec["signer"] not in roots:
        raise ValueError(f"{where}: trust.signer {spec['signer'][:16]}... is none of its roots")
    return Trust(bundle, spec["signer"], roots)

"""The mesh's CA: a root made at first start (or the user's own, root or intermediate), workload certificates
for the identity a token allows, checked by openssl as a peer would; every bad request refused in one line."""
from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshlens.control.ca import CA, CAError, spiffe_id
from meshlens.policy.trust import fingerprint

WEB = spiffe_id("cluster.local", "default", "web")


def csr(identity: str | None = WEB, key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if identity is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def openssl_verify(tmp_path: Path, issued, purpose: str = "sslclient") -> subprocess.CompletedProcess:
    (tmp_path / "bundle.pem").write_text(issued.trust_bundle)
    (tmp_path / "chain.pem").write_text(issued.certificate_chain)
    leaf = x509.load_pem_x509_certificates(issued.certificate_chain.encode())[0]
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(tmp_path / "bundle.pem"),
                           "-untrusted", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True)


def test_a_root_is_made_at_first_start_kept_owner_only_and_found_again(tmp_path):
    ca = CA.open(tmp_path / "ca")
    assert (tmp_path / "ca" / "root-key.pem").stat().st_mode & 0o777 == 0o600
    again = CA.open(tmp_path / "ca")
    assert again.cert == ca.cert and again.bundle() == ca.bundle()


def test_a_workload_certificate_is_the_identity_for_24_hours_and_verifies_as_client_and_server(tmp_path):
    ca = CA.open(tmp_path / "ca")
    issued = ca.sign(csr(), WEB)
    leaf = x509.load_pem_x509_certificates(issued.certificate_chain.encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert leaf.subject == x509.Name([])
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=24) <= life <= dt.timedelta(hours=24, minutes=6)
    for purpose in ("sslclient", "sslserver"):
        out = openssl_verify(tmp_path, issued, purpose)
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stdout + out.stderr
    assert ca.sign(csr(None), WEB).identity == WEB  # a request that names nothing gets the token's identity


def test_the_users_intermediate_signs_and_the_chain_reaches_its_root(tmp_path):
    root_key, mid_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, issuer: str, key, signer):
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    root, mid = cert("corp root", "corp root", root_key, root_key), cert("mesh intermediate", "corp root", mid_key, root_key)
    (tmp_path / "ca-cert.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (mid, root)))
    (tmp_path / "ca-key.pem").write_bytes(mid_key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
    ca = CA.open(tmp_path / "unused", cert_file=str(tmp_path / "ca-cert.pem"), key_file=str(tmp_path / "ca-key.pem"))
    issued = ca.sign(csr(), WEB)
    assert len(x509.load_pem_x509_certificates(issued.certificate_chain.encode())) == 2  # leaf, intermediate
    assert x509.load_pem_x509_certificates(issued.trust_bundle.encode()) == [root]
    assert openssl_verify(tmp_path, issued).returncode == 0
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("request_pem, message", [
    (csr(spiffe_id("cluster.local", "default", "payments")), "the request names spiffe://cluster.local/ns/default/"
                                                              "sa/payments; this token may have spiffe://cluster.local/ns/default/sa/web only"),
    (csr(key=rsa.generate_private_key(65537, 2048)), "workload keys are ECDSA P-256"),
    (csr(key=ec.generate_private_key(ec.SECP384R1())), "workload keys are ECDSA P-256"),
    (b"hello", "not a PEM certificate signing request"),
    (csr()[:200], "not a PEM certificate signing request"),
    (b"x" * 20000, "the certificate request is larger than MAX_CSR_BYTES=16384"),
])
def test_a_bad_request_is_refused_in_one_line(tmp_path, request_pem, message):
    ca = CA.open(tmp_path / "ca")
    with pytest.raises(CAError) as e:
        ca.sign(request_pem, WEB)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_tampered_request_does_not_verify(tmp_path):
    good = x509.load_pem_x509_csr(csr())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        CA.open(tmp_path / "ca").sign(pem, WEB)


@pytest.mark.parametrize("files, message", [
    ({"cert": b"junk", "key": None}, "not a PEM certificate"),
    ({"cert": None, "key": b"junk"}, "not an unencrypted PEM private key"),
    ({"cert": None, "key": "other"}, "is not the key of"),
])
def test_ca_files_that_cannot_be_used_are_refused_naming_the_file(tmp_path, files, message):
    CA.open(tmp_path / "ca")  # a good pair to start from
    cert, key = tmp_path / "ca" / "root-cert.pem", tmp_path / "ca" / "root-key.pem"
    if files["cert"] is not None:
        cert.write_bytes(files["cert"])
    if files["key"] == "other":
        key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif files["key"] is not None:
        key.write_bytes(files["key"])
    with pytest.raises(CAError, match=message):
        CA.open(tmp_path / "x", cert_file=str(cert), key_file=str(key))
    with pytest.raises(CAError, match="go together"):
        CA.open(tmp_path / "x", cert_file=str(cert))


def test_a_root_rotation_trusts_both_roots_across_the_switch_and_the_new_one_alone_after(tmp_path):
    ca = CA.open(tmp_path / "ca")
    old = ca.roots[0]
    with pytest.raises(CAError, match="the next step is begin, not switch"):
        ca.rotate("switch")
    ca.rotate("begin")
    assert ca.rotation == "begun" and ca.roots[0] == old and len(ca.roots) == 2
    new = ca.roots[1]
    assert new.subject != old.subject  # told apart by when each was made
    before = ca.sign(csr(), WEB)
    assert before.root == fingerprint(old)
    ca.rotate("switch")
    assert ca.rotation == "switched" and ca.roots == [new, old]
    assert not (tmp_path / "ca" / "next-root-key.pem").exists()  # the old key is gone; the new one signs
    after = ca.sign(csr(), WEB)
    assert after.root == fingerprint(new)
    for issued in (before, after):  # both verify against the bundle of the overlap
        (tmp_path / "v").mkdir(exist_ok=True)
        assert openssl_verify(tmp_path / "v", replace(issued, trust_bundle=ca.bundle())).returncode == 0
    assert CA.open(tmp_path / "ca").roots == [new, old]  # the state is on disk
    ca.rotate("finish")
    assert ca.rotation == "none" and ca.roots == [new]
    assert openssl_verify(tmp_path / "v", replace(before, trust_bundle=ca.bundle())).returncode != 0


def test_a_switch_cut_by_a_crash_is_completed_at_the_next_start_and_a_cut_begin_undone(tmp_path):
    d = tmp_path / "ca"
    ca = CA.open(d)
    ca.rotate("begin")
    new = ca.roots[1]
    # the switch's first two writes, then a crash: the previous root written, the key moved, the certificate not
    (d / "previous-root-cert.pem").write_bytes((d / "root-cert.pem").read_bytes())
    (d / "next-root-key.pem").replace(d / "root-key.pem")
    again = CA.open(d)
    assert again.rotation == "switched" and again.roots[0] == new and again.sign(csr(), WEB).root == fingerprint(new)
    # a begin cut after its key was written, before its certificate
    again.rotate("finish")
    (d / "next-root-key.pem").write_bytes(b"half")
    assert CA.open(d).rotation == "none" and not (d / "next-root-key.pem").exists()


def test_the_users_files_rotate_by_restarts_with_ca_trust(tmp_path):
    ca = CA.open(tmp_path / "ca")
    with pytest.raises(CAError, match="--ca-trust goes with --ca-cert"):
        CA.open(tmp_path / "ca", trust_file=str(tmp_path / "ca" / "root-cert.pem"))
    other = CA.open(tmp_path / "other")
    own = CA.open(tmp_path / "x", cert_file=str(tmp_path / "ca" / "root-cert.pem"),
                  key_file=str(tmp_path / "ca" / "root-key.pem"), trust_file=str(tmp_path / "other" / "root-cert.pem"))
    assert own.roots == [ca.roots[0], other.roots[0]] and own.rotation == "none"
    with pytest.raises(CAError, match="rotate its root by restarting"):
        own.rotate("begin")

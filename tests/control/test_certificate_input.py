"""What tests/control/test_certificates.py does not try on a real control plane's POST /v1/certificate: bodies of
the wrong shape, CSRs that are not what a sidecar makes, and a hypothesis fuzz of whole bodies. Each is a 4xx with
a one-line message, never a 5xx, and the control plane keeps issuing to a good request."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings, strategies as st

from meshlens.control.ca import MAX_CSR_BYTES
from tests.control.processes import ControlProcess
from tests.control.test_auth import SIDECAR, WRITE, cli, write_tokens
from tests.control.test_ca import WEB, csr

MESH = "services:\n  web: {}\n  api: {namespace: shop, service_account: api-sa}\n"


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """One control plane for every body here: each is refused and leaves it issuing, so none meets another's."""
    tmp = tmp_path_factory.mktemp("certificate-input")
    tokens = write_tokens(tmp / "tokens.yaml")
    with ControlProcess(tmp / "control", 0, None, "--tokens", str(tokens)) as control:
        assert cli(control, "apply", "-f", "-", token=WRITE, stdin=MESH).returncode == 0
        yield control


def post(control: ControlProcess, body: bytes, token: str = SIDECAR) -> tuple[int, bytes]:
    req = urllib.request.Request(control.url + "/v1/certificate", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def refused(control: ControlProcess, body: bytes) -> str:
    """The one-line message a refused body is answered with (a 4xx, never a 5xx)."""
    status, raw = post(control, body)
    assert 400 <= status < 500, (status, raw[:300])
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error and "\n" not in error and len(error) <= 500, error
    return error


def ask(service: object, pem: object) -> bytes:
    return json.dumps({"service": service, "csr": pem}).encode()


def still_issues(control: ControlProcess) -> None:
    status, raw = post(control, ask("web", csr(WEB).decode()))
    assert status == 200 and json.loads(raw)["identity"] == WEB, raw[:300]


def signed(builder: x509.CertificateSigningRequestBuilder, key=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def with_names(*names: x509.GeneralName) -> str:
    return signed(x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                  .add_extension(x509.SubjectAlternativeName(list(names)), critical=True))


def pem_of(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


GOOD_DER = x509.load_pem_x509_csr(csr(WEB)).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("body, says", [
    (b"[]", 'expected JSON {"service": NAME'),
    (b"null", 'expected JSON {"service": NAME'),
    (b'"web"', 'expected JSON {"service": NAME'),
    (b"\xff\xfe{}", 'expected JSON {"service": NAME'),  # not UTF-8
    (ask("web", 7), 'expected JSON {"service": NAME'),
    (json.dumps({"service": "web", "csr": "x", "extra": 1}).encode(), 'expected JSON {"service": NAME'),
    (ask(None, "x"), "service must be"),
    (ask("web\nx", "x"), "service must be"),
    (ask("web", "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"),
     "not a PEM certificate signing request"),
    (ask("web", pem_of(GOOD_DER[:-10])), "not a PEM certificate signing request"),  # cut short
    (ask("web", signed(x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])),
                       rsa.generate_private_key(public_exponent=65537, key_size=2048))), "workload keys are ECDSA P-256"),
    (ask("web", signed(x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])),
                       ec.generate_private_key(ec.SECP384R1()))), "workload keys are ECDSA P-256"),
    (ask("web", with_names(x509.UniformResourceIdentifier(WEB), x509.DNSName("web.default.svc"))), "the request names"),
    (ask("web", with_names(x509.DNSName("web"))), "the request names web; this token may have"),
    # one string of JSON under the body's limit, a CSR over MAX_CSR_BYTES
    (ask("web", "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * (MAX_CSR_BYTES + 100)), "the certificate request is "
     f"larger than MAX_CSR_BYTES={MAX_CSR_BYTES}"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_body_that_is_not_a_sidecars_request_is_refused_in_one_line(control, body, says):
    assert refused(control, body).startswith(says)
    still_issues(control)


def test_a_csr_naming_its_identity_with_a_line_break_is_refused_in_one_line(control):
    """The refusal names what the request asked for: a URI SAN is any IA5 string, line breaks included."""
    refused(control, ask("web", with_names(x509.UniformResourceIdentifier(WEB + "\nx-forged: 1"))))
    still_issues(control)


def mutated_der(data: st.DataObject) -> bytes:
    der = bytearray(GOOD_DER)
    for _ in range(data.draw(st.integers(1, 6))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    return bytes(der[:data.draw(st.integers(1, len(der)))])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=8)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "shaped", "der", "names"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    service = draw(st.sampled_from(["web", "api", "ghost"]) | json_values)
    if kind == "shaped":
        return ask(service, draw(json_values))
    if kind == "der":
        return ask(service, pem_of(mutated_der(draw(st.data()))))
    uri = draw(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60))
    return ask(service, with_names(x509.UniformResourceIdentifier(uri)))


def test_fuzzed_bodies_are_refused_in_one_line_and_the_control_plane_keeps_issuing(control):
    @settings(max_examples=100, deadline=None, database=None)
    @given(body=bodies())
    def one(body: bytes) -> None:
        status, raw = post(control, body)
        if status == 200:  # a mutation the CA still reads as web's own request (a flipped signature bit cannot be)
            assert json.loads(raw)["identity"] == WEB
            return
        assert 400 <= status < 500, (status, raw[:300], body[:300])
        error = json.loads(raw)["error"]
        assert isinstance(error, str) and error and "\n" not in error, (error, body[:300])

    one()
    still_issues(control)
    log = control.log.read_text() if hasattr(control, "log") else ""
    assert "Traceback" not in log, log[-3000:]

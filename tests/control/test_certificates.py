"""Workload certificates from a real control plane: a CSR from the sidecar's own key, answered with the
identity the stored mesh gives its service, only to the token bound to that service; everything else refused."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from cryptography import x509

from tests.control.processes import ControlProcess
from tests.control.test_auth import SIDECAR, WRITE, READ, cli, tokens_file  # noqa: F401 (fixture)
from tests.control.test_ca import csr, openssl_verify

MESH = "services:\n  web: {}\n  api: {namespace: shop, service_account: api-sa}\n"


def post(control: ControlProcess, body: bytes, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(control.url + "/v1/certificate", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(control: ControlProcess, service: str, identity: str | None, token: str | None = None) -> tuple[int, dict]:
    return post(control, json.dumps({"service": service, "csr": csr(identity).decode()}).encode(), token)


def test_a_sidecar_gets_its_services_identity_with_the_chain_and_the_trust_bundle(tmp_path):
    with ControlProcess(tmp_path / "control") as control:
        m = tmp_path / "mesh.yaml"
        m.write_text(MESH)
        assert cli(control, "apply", "-f", str(m)).returncode == 0
        status, web = ask(control, "web", "spiffe://cluster.local/ns/default/sa/web")
        assert status == 200 and web["identity"] == "spiffe://cluster.local/ns/default/sa/web"
        status, api = ask(control, "api", None)  # naming nothing: it gets what the mesh says
        assert status == 200 and api["identity"] == "spiffe://cluster.local/ns/shop/sa/api-sa"
        issued = type("Issued", (), api)
        assert openssl_verify(tmp_path, issued).returncode == 0
        with urllib.request.urlopen(control.url + "/v1/trust-bundle", timeout=30) as resp:
            assert resp.read().decode() == api["trust_bundle"]
        leaf = x509.load_pem_x509_certificates(web["certificate_chain"].encode())[0]
        assert leaf.not_valid_after_utc.isoformat() == web["not_after"]


def test_a_certificate_is_refused_in_one_line_for_what_the_caller_may_not_have(tmp_path, tokens_file):
    with ControlProcess(tmp_path / "control", 0, None, "--tokens", str(tokens_file)) as control:
        m = tmp_path / "mesh.yaml"
        m.write_text(MESH)
        assert cli(control, "apply", "-f", str(m), token=WRITE).returncode == 0
        web_id = "spiffe://cluster.local/ns/default/sa/web"
        assert ask(control, "web", web_id, SIDECAR)[0] == 200
        cases = [
            (ask(control, "api", None, SIDECAR), 403, "token 'web-sidecar' is 'web''s sidecar token, not 'api''s"),
            (ask(control, "web", "spiffe://cluster.local/ns/shop/sa/api-sa", SIDECAR), 400,
             "the request names spiffe://cluster.local/ns/shop/sa/api-sa; this token may have " + web_id + " only"),
            (ask(control, "web", web_id, READ), 403, "token 'viewer' (role read) may not"),
            (ask(control, "web", web_id), 401, "this control plane needs a token"),
            (ask(control, "ghost", None, WRITE), 404, "no service 'ghost' in the stored mesh"),
            (post(control, b"{", SIDECAR), 400, 'expected JSON {"service": NAME, "instance": ID, "csr": '),
            (post(control, json.dumps({"service": "web", "csr": "junk"}).encode(), SIDECAR), 400,
             "not a PEM certificate signing request"),
            (post(control, b"x" * 40000, SIDECAR), 413, "a certificate request is at most MAX_CSR_BYTES=16384"),
        ]
        for (status, body), want_status, want in cases:
            assert status == want_status and body["error"].startswith(want) and "\n" not in body["error"], body
        assert ask(control, "web", web_id, SIDECAR)[0] == 200  # and it keeps serving


def test_a_control_plane_keeps_its_root_across_restarts(tmp_path):
    with ControlProcess(tmp_path / "control") as control:
        with urllib.request.urlopen(control.url + "/v1/trust-bundle", timeout=30) as resp:
            first = resp.read()
    with ControlProcess(tmp_path / "control") as control:
        with urllib.request.urlopen(control.url + "/v1/trust-bundle", timeout=30) as resp:
            assert resp.read() == first


def identity(proxy) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['admin']}/config", timeout=30) as resp:
        return json.loads(resp.read())["identity"]


def test_a_sidecar_gets_its_identity_at_start_and_renews_it_at_half_its_life_with_a_new_key(tmp_path):
    from tests.proxy.processes import ProxyProcess
    from tests.waiting import wait_until

    with ControlProcess(tmp_path / "control", 0, None, "--cert-lifetime", "10s") as control:
        m = tmp_path / "mesh.yaml"
        m.write_text(MESH)
        assert cli(control, "apply", "-f", str(m)).returncode == 0
        with ProxyProcess(tmp_path / "api", None, "api", "--no-record", control=control.url).start() as proxy:
            first = wait_until(lambda: (i := identity(proxy))["state"] == "valid" and i, "the first certificate")
            assert first["identity"] == "spiffe://cluster.local/ns/shop/sa/api-sa" and first["error"] == ""
            # 10 s certificates (the shortest the control plane issues) are renewed after 4-6 s: a second one, before
            # the first expires
            second = wait_until(lambda: (i := identity(proxy))["not_after"] != first["not_after"] and i,
                                "the renewed certificate")
            assert second["state"] == "valid" and second["not_after"] > first["not_after"]
            stopped = control.stop()
            assert stopped == 0
            # the control plane away: the certificate in hand is kept until it expires, then said to be expired
            expired = wait_until(lambda: (i := identity(proxy))["state"] == "expired" and i, "expiry said", 60)
            assert expired["identity"] == first["identity"] and expired["error"]

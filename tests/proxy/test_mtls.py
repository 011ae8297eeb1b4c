"""Mutual TLS between two real sidecars with certificates from a real control plane's CA: originated to an
instance labelled as meshed, terminated on the first bytes, each side recording the other's verified identity;
plaintext still served (PERMISSIVE); a client without a certificate and a server with the wrong identity refused,
with the reason recorded."""
from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.proxy.conftest import free_port
from tests.proxy.policy_app import Instance
from tests.proxy.processes import ProxyProcess, recorded_calls
from tests.control.test_control_cli import cli
from tests.proxy.test_policies import apply, config, follow, mode_doc, request, stats
from tests.waiting import wait_until

COLUMNS = ("observer", "src_service", "dst_service", "path", "status", "tls", "peer_identity", "error", "attributes")
WEB, API = "spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/default/sa/api"


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    col = CollectorProcess(tmp_path_factory.mktemp("collector")).start()
    yield col
    col.stop()


def mesh(inbound: int, namespace: str = "default") -> str:
    return json.dumps({"services": {"web": {}, "api": {"namespace": namespace, "instances": [
        {"address": f"127.0.0.1:{inbound}", "labels": {"security.istio.io/tlsMode": "istio"}}]}}})


def with_identity(proxy: ProxyProcess) -> dict:
    return wait_until(lambda: (c := config(proxy))["identity"] and c["identity"]["state"] == "valid" and c,
                      "the sidecar's certificate")


@contextmanager
def mesh_world(tmp_path: Path, collector: CollectorProcess, *api_args: str):
    """A control plane, api's instance behind its sidecar (with `api_args`), and web's sidecar, both holding their
    certificates: (control, api, web, app, tmp_path)."""
    app = Instance("api").start()
    control = ControlProcess(tmp_path / "control", 0, None, "--calls-store", collector.query_url).start()
    inbound = free_port()
    started: list = [control]
    try:
        revision = apply(control, tmp_path, mesh(inbound))
        record = ("--collector", f"{collector.base}/v1/calls")
        api = ProxyProcess(tmp_path / "api", None, "api", *record, "--app-port", str(app.port), "--inbound-port",
                           str(inbound), *api_args, control=control.url).start()
        started.append(api)
        web = ProxyProcess(tmp_path / "web", None, "web", *record, control=control.url).start()
        started.append(web)
        for p in (api, web):
            follow(p, revision)
            with_identity(p)
        yield control, api, web, app, tmp_path
    finally:
        for p in reversed(started):
            p.stop()
        app.stop()


@pytest.fixture
def world(tmp_path: Path, collector: CollectorProcess):
    with mesh_world(tmp_path, collector) as w:
        yield w


def rows(collector: CollectorProcess, proxy: ProxyProcess, n: int, where: str = "1") -> list[dict]:
    me = config(proxy)["observer_id"]
    return recorded_calls(collector.query_url, f"observer_id = '{me}' AND {where}", n, columns=COLUMNS)


def test_calls_between_meshed_sidecars_are_mtls_with_each_sides_identity_recorded(world, collector):
    control, api, web, app, _ = world
    assert config(web)["identity"]["identity"] == WEB and config(api)["identity"]["identity"] == API
    assert request(web.outbound, "api", "/orders")[:2] == (200, "api")
    [client] = rows(collector, web, 1)
    [server] = rows(collector, api, 1)
    assert (client["tls"], client["peer_identity"], client["status"]) == (True, API, 200)
    assert (server["tls"], server["peer_identity"], server["src_service"]) == (True, WEB, "web")
    assert stats(web)["upstream_cx_mtls"] == 1 and stats(api)["downstream_cx_mtls"] == 1
    # PERMISSIVE: plaintext is served too, and recorded as such
    assert request(api.inbound, "api", "/plain")[:2] == (200, "api")
    [plain] = rows(collector, api, 1, "path = '/plain'")
    assert (plain["tls"], plain["peer_identity"]) == (False, "")


def test_a_client_without_a_mesh_certificate_is_refused_with_the_reason_recorded(world, collector):
    control, api, web, app, tmp_path = world
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{api.inbound}", "-alpn", "istio-http/1.1",
                          "-brief"], input="GET / HTTP/1.1\r\nHost: api\r\n\r\n", capture_output=True, text=True,
                         timeout=60)
    assert "HTTP/1.1 200" not in out.stdout
    [refused] = rows(collector, api, 1, "error = 'tls_handshake'")
    assert refused["tls"] and "certificate" in refused["attributes"]["tls_error"], refused
    assert stats(api)["downstream_cx_tls_refused"] == 1
    assert request(web.outbound, "api", "/after")[0] == 200  # and it keeps serving the mesh


def test_a_server_whose_identity_is_not_the_destination_services_is_refused(world, collector):
    control, api, web, app, tmp_path = world
    inbound = api.inbound
    revision = apply(control, tmp_path, mesh(inbound, namespace="shop"))  # api now expected in shop; its cert: default
    follow(web, revision)
    status, body, _ = request(web.outbound, "api", "/who")
    assert status == 503 and f"it is {API}, not spiffe://cluster.local/ns/shop/sa/api" in body
    [row] = rows(collector, web, 1, "path = '/who'")
    assert row["error"] == "tls_identity" and app.arrived["/who"] == 0
    assert stats(web)["upstream_cx_identity_refused"] >= 1


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api-strict, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: STRICT}
"""


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_strict_refuses_plaintext_when_enforced_and_says_it_would_in_dry_run(world, collector, mode):
    control, api, web, app, tmp_path = world
    revision = apply(control, tmp_path, mesh(api.inbound), STRICT, mode_doc("api", mode),
                     flags=("--force",))  # past the readiness gate, tested on its own below
    follow(api, revision)
    follow(web, revision)
    assert request(web.outbound, "api", "/mesh")[:2] == (200, "api")  # mTLS: always welcome
    plain = None
    try:
        plain = request(api.inbound, "api", "/plain", timeout=30)[0]
    except OSError:  # the connection closed with no answer, as Envoy's when no filter chain matches
        plain = "refused"
    mesh_row = rows(collector, api, 1, "path = '/mesh'")[0]
    assert mesh_row["peer_identity"] == WEB
    if mode == "enforce":
        assert plain == "refused" and app.arrived["/plain"] == 0
        [row] = rows(collector, api, 1, "error = 'plaintext_refused'")
        assert row["attributes"]["mtls"] == "STRICT" and stats(api)["downstream_cx_plaintext_refused"] == 1
    else:
        assert plain == 200 and app.arrived["/plain"] == 1
        [row] = recorded_calls(collector.query_url, f"observer_id = '{config(api)['observer_id']}' AND path = "
                               "'/plain'", 1, columns=("action", "mode", "tls"))
        assert row == {"action": "would_refuse_plaintext", "mode": "dry-run", "tls": False}


def test_a_plaintext_connection_open_before_strict_says_it_would_be_refused_then_is_drained(world, collector):
    """STRICT is judged on a connection's first bytes; a keep-alive one opened before it is judged again by the
    snapshot that brings it: its calls say would_refuse_plaintext in dry-run, and enforced it is drained."""
    import http.client

    control, api, web, app, tmp_path = world
    conn = http.client.HTTPConnection("127.0.0.1", api.inbound, timeout=30)

    def get(path: str) -> int:
        conn.request("GET", path, headers={"Host": "api"})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    try:
        assert get("/before") == 200  # PERMISSIVE: plaintext served
        for mode in ("dry-run", "enforce"):
            follow(api, apply(control, tmp_path, mesh(api.inbound), STRICT, mode_doc("api", mode), flags=("--force",)))
            if mode == "dry-run":
                assert get("/kept-alive") == 200
                [row] = recorded_calls(collector.query_url, f"observer_id = '{config(api)['observer_id']}' AND path = "
                                       "'/kept-alive'", 1, columns=("action", "mode", "tls"))
                assert row == {"action": "would_refuse_plaintext", "mode": "dry-run", "tls": False}
        wait_until(lambda: stats(api)["downstream_cx_plaintext_drained"] == 1, "the plaintext connection drained")
        with pytest.raises((http.client.HTTPException, OSError)):
            get("/after")
        assert app.arrived["/after"] == 0
    finally:
        conn.close()


def client_cert(tmp_path: Path, ca_dir: Path | None, identity: str, now_offset_h: float = 0, hours: float = 1):
    """A client certificate for `identity`: from the control plane's CA (`ca_dir`), or from a CA of its own."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from meshlens.control.ca import CA
    from tests.control.test_ca import csr as make_csr
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    ca = CA.open(ca_dir if ca_dir is not None else tmp_path / f"other-ca-{identity[-3:]}")
    now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=now_offset_h)
    issued = ca.sign(make_csr(identity, key), identity, now=now, lifetime=dt.timedelta(hours=hours))
    cert, keyfile = tmp_path / f"c{now_offset_h}.pem", tmp_path / f"k{now_offset_h}.pem"
    cert.write_text(issued.certificate_chain)
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, keyfile


@pytest.mark.parametrize("case, reason", [
    ("expired", "expired"), ("not yet valid", "not yet valid"), ("another CA", "unable to get local issuer")])
def test_a_client_certificate_that_is_not_good_is_refused_with_the_reason(world, collector, case, reason):
    control, api, web, app, tmp_path = world
    ca_dir = control.workdir / "ca"
    cert, key = {"expired": lambda: client_cert(tmp_path, ca_dir, WEB, -3),
                 "not yet valid": lambda: client_cert(tmp_path, ca_dir, WEB, +3),
                 "another CA": lambda: client_cert(tmp_path, None, WEB)}[case]()
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{api.inbound}", "-alpn", "istio-http/1.1",
                          "-cert", str(cert), "-key", str(key), "-brief"],
                         input="GET /x HTTP/1.1\r\nHost: api\r\n\r\n", capture_output=True, text=True, timeout=60)
    assert "HTTP/1.1 200" not in out.stdout
    [row] = rows(collector, api, 1, "error = 'tls_handshake'")
    assert reason in row["attributes"]["tls_error"], row
    assert app.arrived["/x"] == 0 and request(web.outbound, "api", "/still")[0] == 200


def test_garbage_and_cut_hellos_are_refused_or_passed_and_the_sidecar_keeps_serving(world, collector):
    import socket

    control, api, web, app, tmp_path = world
    for data in (b"\x16\x03\x01\x00\x10" + b"\xff" * 16,  # a handshake record that is no ClientHello
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a hello cut short, then the client leaves
                 b"\x16\x03\x01" + b"\x00" * 3):
        with socket.create_connection(("127.0.0.1", api.inbound), timeout=30) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
    assert request(web.outbound, "api", "/fine")[0] == 200
    assert request(api.inbound, "api", "/plain-fine")[0] == 200


ONLY_WEB = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/web], namespaces: [default]}}]
"""


def test_authorization_decides_on_the_verified_mtls_identity(world, collector):
    control, api, web, app, tmp_path = world
    revision = apply(control, tmp_path, mesh(api.inbound), ONLY_WEB, mode_doc("api", "enforce"))
    follow(api, revision)
    follow(web, revision)
    assert request(web.outbound, "api", "/from-web")[:2] == (200, "api")  # mTLS as web: allowed
    assert request(api.inbound, "api", "/from-nobody")[:2] == (403, "RBAC: access denied\n")  # plaintext: no principal
    [denied] = rows(collector, api, 1, "path = '/from-nobody'")
    assert (denied["status"], denied["peer_identity"]) == (403, "")


def test_readiness_names_who_would_break_under_strict_and_the_order_that_breaks_no_one(world, collector):
    import os
    import sys

    import datetime as dt

    control, api, web, app, tmp_path = world
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert request(web.outbound, "api", "/ready-mtls")[0] == 200
    assert request(api.inbound, "api", "/ready-plain")[0] == 200  # a caller with no sidecar: curl on loopback
    rows(collector, api, 2)
    rows(collector, web, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "mtls", "readiness", "api", "--store",
                          collector.query_url, "--since", since, "--format", "json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    [r] = json.loads(out.stdout)
    callers = {c["caller"]: c for c in r["callers"]}
    assert callers["web"]["mtls"] >= 1 and callers["web"]["plaintext"] == 0 and callers["web"]["sidecar"]
    plain = callers["127.0.0.1"]
    assert plain["plaintext"] >= 1 and not plain["sidecar"] and plain["last_plaintext"].endswith("Z")
    assert r["would_break"] == ["127.0.0.1"] and r["verdict"] == "blocked by 127.0.0.1"
    assert r["steps"][0].startswith("give 127.0.0.1 a sidecar") and r["steps"][-1].endswith("the server goes STRICT last")
    table = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "mtls", "readiness", "api", "--store",
                            collector.query_url, "--since", since], capture_output=True, text=True, env=env,
                           timeout=120).stdout
    assert table.startswith("api: blocked by 127.0.0.1; would break under STRICT now: 127.0.0.1") and "1. give" in table


def test_the_gate_refuses_enforcing_strict_while_plaintext_callers_remain_and_dry_run_names_the_same(
        world, collector):
    control, api, web, app, tmp_path = world
    assert request(web.outbound, "api", "/gate-mtls")[0] == 200
    assert request(api.inbound, "api", "/gate-plain")[0] == 200
    rows(collector, api, 2)
    revision = apply(control, tmp_path, mesh(api.inbound), STRICT, mode_doc("api", "dry-run"))  # dry-run: allowed
    follow(api, revision)
    assert request(api.inbound, "api", "/gate-dry")[0] == 200
    [dry] = recorded_calls(collector.query_url, f"observer_id = '{config(api)['observer_id']}' AND path = "
                           "'/gate-dry'", 1, columns=("action", "src_addr"))
    assert dry["action"] == "would_refuse_plaintext"
    refused = cli(control, "mode", "set", "api", "enforce", "--reason", "go strict")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "STRICT mTLS would refuse plaintext callers of the last 24 h: api: 127.0.0.1 (" in refused.stderr
    assert dry["src_addr"] == "127.0.0.1"  # the caller dry-run recorded is the one the gate names
    assert "web" not in refused.stderr.split("api: ", 1)[1]  # the mTLS caller breaks nothing
    assert "dry-run" in cli(control, "mode", "get", "api").stdout  # nothing changed
    forced = cli(control, "mode", "set", "api", "enforce", "--reason", "go strict anyway", "--force")
    assert forced.returncode == 0, forced.stderr


def test_without_a_calls_store_enforcing_strict_needs_force_and_says_why(tmp_path):
    with ControlProcess(tmp_path / "control") as control:
        f = tmp_path / "strict.yaml"
        f.write_text("\n---\n".join(d.strip() for d in (mesh(9), STRICT, mode_doc("api", "enforce"))) + "\n")
        out = cli(control, "apply", "-f", str(f))
        assert out.returncode == 2 and out.stderr.count("\n") == 1
        assert "STRICT mTLS would be enforced on api, and who still calls in plaintext cannot be checked" in out.stderr
        assert cli(control, "apply", "-f", str(f), "--force").returncode == 0


ONE_PER_CONNECTION = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-one-per-connection}
spec:
  host: api
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 1}
"""


def one_connection_per_request(control, api, web, tmp_path: Path) -> int:
    revision = apply(control, tmp_path, mesh(api.inbound), ONE_PER_CONNECTION, mode_doc("api", "enforce"))
    follow(api, revision)
    follow(web, revision)
    return revision


def identities(collector: CollectorProcess, web: ProxyProcess, api: ProxyProcess, path: str) -> tuple:
    [client] = rows(collector, web, 1, f"path = '{path}'")
    [server] = rows(collector, api, 1, f"path = '{path}'")
    return (client["status"], client["tls"], client["peer_identity"]), (server["tls"], server["peer_identity"])


def test_a_second_connection_to_the_same_server_resumes_its_session_and_both_sides_still_verify(world, collector):
    control, api, web, app, tmp_path = world
    one_connection_per_request(control, api, web, tmp_path)
    assert request(web.outbound, "api", "/full")[:2] == (200, "api")
    assert stats(web)["upstream_cx_mtls_resumed"] == 0
    assert request(web.outbound, "api", "/resumed")[:2] == (200, "api")  # a new connection: the ticket offered
    s = stats(web)
    assert (s["upstream_cx_mtls"], s["upstream_cx_mtls_resumed"]) == (2, 1)
    assert stats(api)["downstream_cx_mtls"] == 2
    for path in ("/full", "/resumed"):  # no certificate is sent on resumption: the session's are checked
        assert identities(collector, web, api, path) == ((200, True, API), (True, WEB))


def test_a_server_that_refuses_the_ticket_gets_a_full_handshake_and_no_request_fails(world, collector):
    control, api, web, app, tmp_path = world
    revision = one_connection_per_request(control, api, web, tmp_path)
    assert request(web.outbound, "api", "/before")[0] == 200
    assert request(web.outbound, "api", "/resumed")[0] == 200
    assert stats(web)["upstream_cx_mtls_resumed"] == 1
    api.stop()  # its ticket keys, and its certificate, go with the process
    api.start()
    follow(api, revision)
    with_identity(api)
    assert request(web.outbound, "api", "/after-restart")[:2] == (200, "api")  # the old ticket offered, refused
    s = stats(web)
    assert (s["upstream_cx_mtls"], s["upstream_cx_mtls_resumed"], s["upstream_cx_total"]) == (3, 1, 3)
    assert identities(collector, web, api, "/after-restart") == ((200, True, API), (True, WEB))
    assert request(web.outbound, "api", "/resumed-again")[0] == 200  # the new server's ticket, kept
    assert stats(web)["upstream_cx_mtls_resumed"] == 2


def test_sessions_are_kept_per_address_for_the_context_in_force_and_a_renewal_drops_them(monkeypatch):
    import ssl

    from meshlens.proxy import mtls

    cache = mtls.SessionCache()
    old, new = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    a, b, c = ("10.0.0.1", 15006), ("10.0.0.2", 15006), ("10.0.0.3", 15006)
    assert cache.get(old, a) is None  # the first connection with this context
    cache.put(old, a, "session-a")  # type: ignore[arg-type]
    assert (cache.get(old, a), cache.get(old, b)) == ("session-a", None)
    cache.put(old, a, "session-a2")  # type: ignore[arg-type]
    assert cache.get(old, a) == "session-a2"  # the last one kept
    assert cache.get(new, a) is None  # renewed: a new context asked for, the old one's sessions dropped
    assert repr(cache) == "<SessionCache sessions=0>"
    cache.put(old, a, "late")  # type: ignore[arg-type]  # a connection of the old context ending late: not kept
    assert cache.get(new, a) is None
    monkeypatch.setattr(mtls, "MAX_SESSIONS", 2)
    for addr in (a, b, c):
        cache.put(new, addr, f"session-{addr[0]}")  # type: ignore[arg-type]
    assert (cache.get(new, a), cache.get(new, b), cache.get(new, c)) == (None, "session-10.0.0.2", "session-10.0.0.3")
    monkeypatch.setattr(mtls, "MAX_SESSIONS", 0)  # keeps none
    cache.put(new, a, "session-a")  # type: ignore[arg-type]
    assert cache.get(new, a) is None

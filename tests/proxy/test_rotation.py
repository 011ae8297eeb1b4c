"""Certificates and roots rotated under a paced load with no failed request; the control plane away until the
certificates expire, and back; a token taken out of the tokens file revoked. Real control plane, real sidecars
(web -> api over mTLS, a new upstream connection every third request so that new handshakes meet the rotated
certificates and old connections carry on), real requests."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meshlens.policy.trust import fingerprint
from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.control.test_control_cli import cli
from tests.proxy.conftest import free_port
from tests.proxy.policy_app import Instance
from tests.proxy.processes import ProxyProcess
from tests.proxy.test_mtls import API, WEB, mesh, rows, with_identity
from tests.proxy.test_policies import apply, config, follow, mode_doc, request, stats
from tests.waiting import wait_until

# Every third request on a new upstream connection: new handshakes under each certificate and root.
POOL = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 3}
"""


class PacedLoad:
    """Requests through the client sidecar, one every PACE_S, until stopped or MAX_REQUESTS: the statuses kept."""

    PACE_S, MAX_REQUESTS = 0.02, 20_000

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PacedLoad:
        self._thread.start()
        wait_until(lambda: len(self.statuses) >= 5, "the load's first requests")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.statuses) < self.MAX_REQUESTS:
            try:
                status, body, _ = request(self.port, "api", f"/load/{len(self.statuses)}", timeout=30)
            except OSError as e:
                status, body = 0, str(e)
            self.statuses.append(status)
            if status != 200:
                self.failures.append(f"{status} {body[:200]}")
            self._stop.wait(self.PACE_S)

    def requests_after(self, n: int) -> None:
        """Wait until `n` more requests were answered (whatever their status)."""
        target = len(self.statuses) + n
        wait_until(lambda: len(self.statuses) >= target, f"{n} more requests of the load")


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    col = CollectorProcess(tmp_path_factory.mktemp("collector")).start()
    yield col
    col.stop()


class World:
    """A control plane (on a port kept across its restarts), the api service's instance, its sidecar and web's."""

    def __init__(self, tmp_path: Path, collector: CollectorProcess, *control_args: str,
                 web_args: tuple[str, ...] = ()) -> None:
        self.tmp_path = tmp_path
        self.app = Instance("api").start()
        self.control_args = control_args
        self.control = ControlProcess(tmp_path / "control", free_port(), None, *control_args).start()
        self.inbound = free_port()
        self.proxies: list[ProxyProcess] = []
        record = ("--collector", f"{collector.base}/v1/calls")
        revision = apply(self.control, tmp_path, mesh(self.inbound), POOL, mode_doc("api", "enforce"))
        self.api = self._proxy("api", *record, "--app-port", str(self.app.port), "--inbound-port", str(self.inbound))
        self.web = self._proxy("web", *record, *web_args)
        for p in self.proxies:
            follow(p, revision)
            with_identity(p)

    def _proxy(self, service: str, *args: str) -> ProxyProcess:
        p = ProxyProcess(self.tmp_path / service, None, service, *args, control=self.control.url).start()
        self.proxies.append(p)
        return p

    def restart_control(self) -> None:
        self.control = ControlProcess(self.tmp_path / "control", self.control.port, None, *self.control_args).start()

    def close(self) -> None:
        for p in reversed(self.proxies):
            p.stop()
        self.control.stop()
        self.app.stop()


def identity(proxy: ProxyProcess) -> dict:
    return config(proxy)["identity"]


def ca_status(control: ControlProcess) -> dict:
    out = cli(control, "ca", "status", "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def rotate(control: ControlProcess, step: str, *flags: str):
    return cli(control, "ca", "rotate", step, "--reason", "test", *flags)


def test_certificates_renewed_again_and_again_under_a_paced_load_fail_no_request(tmp_path, collector):
    world = World(tmp_path, collector, "--cert-lifetime", "10s")
    try:
        with PacedLoad(world.web.outbound) as load:
            # 10 s certificates are renewed every 4-6 s: three new ones on each side, each with a new key
            before = {p.service: identity(p)["renewals"] for p in world.proxies}
            for p in world.proxies:
                wait_until(lambda p=p: identity(p)["renewals"] >= before[p.service] + 3, f"{p.service}'s renewals")
            load.requests_after(20)
        assert load.failures == [] and len(load.statuses) >= 25
        # every call on both sides was mTLS with the verified peer (the recorder is a batch behind: a sample)
        [server] = rows(collector, world.api, 1, "path LIKE '/load/%'")[-1:]
        assert (server["tls"], server["peer_identity"]) == (True, WEB)
    finally:
        world.close()


def test_the_root_rotated_in_three_steps_under_a_paced_load_fails_no_request(tmp_path, collector):
    world = World(tmp_path, collector)
    try:
        old = ca_status(world.control)["roots"]
        assert [r["role"] for r in old] == ["signer"] and ca_status(world.control)["next_step"] == "begin"
        old_root = old[0]["fingerprint"]
        assert all(identity(p)["root"] == old_root for p in world.proxies)
        handshakes = stats(world.web)["upstream_cx_mtls"]
        with PacedLoad(world.web.outbound) as load:
            # begin: every sidecar trusts the new root with its next snapshot, still holding the old one's certificate
            out = rotate(world.control, "begin")
            assert out.returncode == 0 and "begin stored" in out.stdout, out.stderr
            new_root = next(r["fingerprint"] for r in ca_status(world.control)["roots"] if r["role"] == "next")
            for p in world.proxies:
                wait_until(lambda p=p: identity(p)["trusts"] == [old_root, new_root], f"{p.service} trusting both")
            assert all(identity(p)["root"] == old_root for p in world.proxies)
            out = rotate(world.control, "finish")  # not the next step
            assert out.returncode != 0 and "the next step is switch, not finish" in out.stderr
            load.requests_after(10)
            # switch: the new root signs, every sidecar renews at once (its 24 h certificate far from half its life)
            wait_until(lambda: ca_status(world.control)["ready"], "every sidecar ready for the switch")
            out = rotate(world.control, "switch")
            assert out.returncode == 0, out.stderr
            for p in world.proxies:
                wait_until(lambda p=p: identity(p)["root"] == new_root, f"{p.service}'s certificate from the new root")
            assert all(identity(p)["trusts"] == [new_root, old_root] for p in world.proxies)
            load.requests_after(10)
            # finish: the old root dropped everywhere
            wait_until(lambda: ca_status(world.control)["ready"], "every sidecar ready to finish")
            out = rotate(world.control, "finish")
            assert out.returncode == 0 and "the rotation is done" in out.stdout, out.stderr
            for p in world.proxies:
                wait_until(lambda p=p: identity(p)["trusts"] == [new_root], f"{p.service} trusting the new root alone")
            load.requests_after(20)
        assert load.failures == [] and len(load.statuses) >= 45
        assert stats(world.web)["upstream_cx_mtls"] - handshakes >= 15  # new connections all along the way
        status = ca_status(world.control)
        assert [(r["role"], r["fingerprint"]) for r in status["roots"]] == [("signer", new_root)]
        assert status["rotation"] == "none" and status["next_step"] == "begin"
        apply(world.control, tmp_path, mode_doc("web", "dry-run"))  # the stored trust is no obstacle to an apply
        history = cli(world.control, "history", "--kind", "TrustBundle")
        assert [line.split("  ")[-1] for line in history.stdout.splitlines()] == ["(test)"] * 3
        assert "2 root(s), rotation begun" in history.stdout and "1 root(s), rotation none" in history.stdout
        # the new root survives a restart of the control plane; the sidecars' trust is unchanged by it
        world.control.stop()
        world.restart_control()
        assert [r["fingerprint"] for r in ca_status(world.control)["roots"]] == [new_root]
        assert request(world.web.outbound, "api", "/after-restart")[0] == 200
    finally:
        world.close()


def test_a_step_that_would_break_a_sidecar_is_refused_naming_it_unless_forced(tmp_path):
    """The gate, with a sidecar that says what it holds on its polls (as a real one does)."""
    with ControlProcess(tmp_path / "control", 0, None) as control:
        apply(control, tmp_path, mesh(free_port()))
        old = ca_status(control)["roots"][0]["fingerprint"]

        def poll(root: str, *trusts: str) -> None:
            q = f"service=api&instance=api-1&version=&timeout=0&root={root}&trusts={','.join(trusts)}"
            with urllib.request.urlopen(f"{control.url}/v1/snapshot?{q}", timeout=30) as resp:
                assert resp.status == 200

        poll(old, old)
        assert rotate(control, "begin").returncode == 0
        new = next(r["fingerprint"] for r in ca_status(control)["roots"] if r["role"] == "next")
        out = rotate(control, "switch")
        assert out.returncode == 2 and "1 sidecar(s) do not trust the new root yet" in out.stderr
        assert "api/api-1" in out.stderr and "\n" not in out.stderr.strip()
        assert ca_status(control)["rotation"] == "begun"  # nothing changed
        poll(old, old, new)
        assert rotate(control, "switch").returncode == 0
        out = rotate(control, "finish")
        assert out.returncode == 2 and "still hold a certificate from the old root" in out.stderr
        assert rotate(control, "finish", "--force").returncode == 0
        assert [r["fingerprint"] for r in ca_status(control)["roots"]] == [new]
        # what the rotation is asked wrongly: 400, one line, nothing changed
        for body in (b"", b"{", b"[]", b'{"step": "again"}', b'{"step": "begin", "extra": 1}',
                     b'{"step": "begin", "reason": 7}'):
            req = urllib.request.Request(f"{control.url}/v1/ca/rotate", data=body, method="POST")
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError(f"{body!r} was taken")
            except urllib.error.HTTPError as e:
                assert e.code == 400 and json.loads(e.read())["error"].startswith("expected JSON"), body
        assert ca_status(control)["rotation"] == "none"
        # a malformed fingerprint on a poll: 400, one line
        q = "service=api&instance=api-1&version=&timeout=0&root=nothex"
        try:
            urllib.request.urlopen(f"{control.url}/v1/snapshot?{q}", timeout=30)
            raise AssertionError("a poll with a malformed root was answered")
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "SHA-256 fingerprints" in json.loads(e.read())["error"]


def test_the_control_plane_away_past_expiry_then_back(tmp_path, collector):
    """Until the certificates expire nothing changes; after, web's calls go plaintext (api is PERMISSIVE: served,
    recorded as plaintext) and nothing is mTLS; once the control plane is back, both renew and mTLS resumes."""
    world = World(tmp_path, collector, "--cert-lifetime", "10s")
    try:
        world.control.stop()
        assert request(world.web.outbound, "api", "/before-expiry")[0] == 200
        [before] = rows(collector, world.api, 1, "path = '/before-expiry'")
        assert (before["tls"], before["peer_identity"]) == (True, WEB)
        for p in world.proxies:
            expired = wait_until(lambda p=p: (i := identity(p))["state"] == "expired" and i, f"{p.service} expired")
            assert expired["error"]  # why it could not renew: the control plane unreachable
        assert request(world.web.outbound, "api", "/expired")[0] == 200
        [plain] = rows(collector, world.api, 1, "path = '/expired'")
        assert (plain["tls"], plain["peer_identity"]) == (False, "")
        world.restart_control()
        for p in world.proxies:
            wait_until(lambda p=p: identity(p)["state"] == "valid", f"{p.service} renewed once the control plane is back")
        # a connection pooled while web was plaintext is reused for up to two more requests: then mTLS again
        wait_until(lambda: request(world.web.outbound, "api", "/back")[0] == 200
                   and rows(collector, world.api, 1, "path = '/back' AND tls")[:1], "an mTLS call again")
        [back] = rows(collector, world.api, 1, "path = '/back' AND tls")[:1]
        assert back["peer_identity"] == WEB
    finally:
        world.close()


def test_a_token_taken_out_of_the_tokens_file_is_revoked_and_the_sidecar_keeps_serving(tmp_path):
    from tests.control.test_auth import cli as cli_with

    sidecar, writer = "s" * 32, "w" * 32
    tokens = tmp_path / "tokens.yaml"

    def write(*entries: str) -> None:
        tmp = tokens.with_suffix(".tmp")
        tmp.write_text("tokens:\n" + "".join(f"  - {e}\n" for e in entries))
        tmp.replace(tokens)

    write(f"{{name: ana, token: {writer}, role: write}}",
          f"{{name: api-sidecar, token: {sidecar}, role: sidecar, service: api}}")
    app = Instance("api").start()
    try:
        with ControlProcess(tmp_path / "control", 0, None, "--tokens", str(tokens), "--cert-lifetime", "10s") \
                as control:
            (tmp_path / "mesh.yaml").write_text(mesh(free_port()))
            assert cli_with(control, "apply", "-f", str(tmp_path / "mesh.yaml"), token=writer).returncode == 0
            with ProxyProcess(tmp_path / "api", None, "api", "--no-record", "--app-port", str(app.port),
                              "--control-token", sidecar, control=control.url).start() as api:
                with_identity(api)
                write(f"{{name: ana, token: {writer}, role: write}}")  # api-sidecar's token taken out
                refused = wait_until(lambda: (i := identity(api))["error"] and "needs a token" in i["error"] and i,
                                     "the renewal refused")
                assert refused["state"] in ("renewing", "expired", "refused")
                status = json.loads(cli_with(control, "ca", "status", "-o", "json", token=writer).stdout)
                assert status["refused"] >= 1
                # the sidecar keeps serving on what it holds (its snapshot; plaintext until a certificate is back)
                assert request(api.inbound, "api", "/still")[:2] == (200, "api")
    finally:
        app.stop()


def test_your_own_ca_files_rotate_by_restarts_and_each_restart_reaches_the_sidecars(tmp_path):
    """--ca-cert files: the new root trusted first (--ca-trust), then signing with the old one trusted, then alone;
    each restart stores the trust that changed, and the sidecar follows it."""
    from meshlens.control.ca import CA

    old, new = CA.open(tmp_path / "old"), CA.open(tmp_path / "new")
    files = {name: (str(tmp_path / name / "root-cert.pem"), str(tmp_path / name / "root-key.pem"))
             for name in ("old", "new")}
    app = Instance("api").start()
    port, control = free_port(), None
    try:
        def start(signer: str, *trust: str) -> ControlProcess:
            cert, key = files[signer]
            args = ["--ca-cert", cert, "--ca-key", key] + (["--ca-trust", files[trust[0]][0]] if trust else [])
            return ControlProcess(tmp_path / "control", port, None, *args).start()

        control = start("old")
        revision = apply(control, tmp_path, mesh(free_port()))
        with ProxyProcess(tmp_path / "api", None, "api", "--no-record", "--app-port", str(app.port),
                          control=control.url).start() as api:
            follow(api, revision)
            fp_old, fp_new = (fingerprint(ca.roots[0]) for ca in (old, new))
            assert with_identity(api)["identity"]["root"] == fp_old
            for signer, trust, trusts in (("old", ("new",), [fp_old, fp_new]), ("new", ("old",), [fp_new, fp_old]),
                                          ("new", (), [fp_new])):
                control.stop()
                control = start(signer, *trust)
                wait_until(lambda t=trusts: identity(api)["trusts"] == t, f"the sidecar trusting {trusts}")
                want = fp_old if signer == "old" else fp_new
                wait_until(lambda w=want: identity(api)["root"] == w, "its certificate from the signer")
            assert request(api.inbound, "api", "/")[0] == 200
    finally:
        if control is not None:
            control.stop()
        app.stop()

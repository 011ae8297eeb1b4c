"""Tokens and TLS on the control plane: who may read, change, or poll as which sidecar, over HTTPS."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshlens.control.auth import TokenError, load_tokens
from tests.control.processes import ControlProcess
from tests.control.test_distribution import apps, config, get, mesh, sidecar  # noqa: F401 (fixture)
from tests.proxy.processes import ProxyProcess

WRITE, READ, SIDECAR = "w" * 32, "r" * 32, "s" * 32


def cli(control: ControlProcess, *args: str, token: str | None = None, ca: str | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    env["MESHLENS_CONTROL"] = control.url
    if token:
        env["MESHLENS_TOKEN"] = token
    if ca:
        env["MESHLENS_CONTROL_CA"] = ca
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=60)


@pytest.fixture
def tokens_file(tmp_path):
    return write_tokens(tmp_path / "tokens.yaml")


def write_tokens(f: Path) -> Path:
    """A tokens file with one token of each role (WRITE, READ by its hash, SIDECAR for web)."""
    f.write_text(f"""tokens:
  - {{name: ana, token: {WRITE}, role: write}}
  - {{name: viewer, token_sha256: {hashlib.sha256(READ.encode()).hexdigest()}, role: read}}
  - {{name: web-sidecar, token: {SIDECAR}, role: sidecar, service: web}}
""")
    return f


@pytest.fixture
def cert(tmp_path):
    key, pem = tmp_path / "api.key", tmp_path / "api.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(pem), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return pem, key


def test_each_role_may_do_what_it_names_and_changes_carry_the_tokens_name(tmp_path, tokens_file):
    with ControlProcess(tmp_path / "control", 0, None, "--tokens", str(tokens_file)) as control:
        out = cli(control, "mode", "get")
        assert out.returncode == 2 and out.stderr.startswith("meshlens mode: this control plane needs a token")
        assert cli(control, "mode", "get", token="x" * 32).returncode == 2  # not one of ours
        m = tmp_path / "mesh.yaml"
        m.write_text("services:\n  web: {}\n  api: {}\n")
        refused = cli(control, "apply", "-f", str(m), token=READ)
        assert refused.returncode == 2 and "token 'viewer' (role read) may not change anything" in refused.stderr
        assert cli(control, "apply", "-f", str(m), token=WRITE).returncode == 0
        assert cli(control, "mode", "get", token=READ).stdout.split() == ["SERVICE", "MODE", "api", "observe", "web",
                                                                          "observe"]
        assert cli(control, "mode", "set", "web", "dry-run", "--reason", "x", token=SIDECAR).returncode == 2
        entries = json.loads(cli(control, "history", "-o", "json", token=READ).stdout)
        assert {e["who"] for e in entries} == {"ana"}  # the token's name, whatever user the CLI says it is
        assert get(f"{control.url}/healthz")[0] == 200  # health needs no token


def test_a_sidecars_token_takes_its_own_services_snapshot_only(tmp_path, tokens_file, apps):  # noqa: F811
    with ControlProcess(tmp_path / "control", 0, None, "--tokens", str(tokens_file)) as control:
        m = tmp_path / "mesh.yaml"
        m.write_text(mesh(apps[0].port))
        assert cli(control, "apply", "-f", str(m), token=WRITE).returncode == 0
        with ProxyProcess(tmp_path / "proxy", None, "web", "--no-record", "--control-token", SIDECAR,
                          control=control.url).start() as proxy:
            assert config(proxy)["control"]["state"] == "ACK"
        out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "proxy", "--service", "backend", "--control",
                              control.url, "--control-token", SIDECAR, "--snapshot-cache", str(tmp_path / "b.json"),
                              "--no-record"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "answered 403" in out.stderr and "'web''s sidecar token" in out.stderr


def test_the_api_over_https_is_checked_against_the_ca_given(tmp_path, tokens_file, cert, apps):  # noqa: F811
    pem, key = cert
    with ControlProcess(tmp_path / "control", 0, None, "--tokens", str(tokens_file), "--tls-cert", str(pem),
                        "--tls-key", str(key)) as control:
        assert control.url.startswith("https://")
        m = tmp_path / "mesh.yaml"
        m.write_text(mesh(apps[0].port))
        unchecked = cli(control, "apply", "-f", str(m), token=WRITE)
        assert unchecked.returncode == 2 and "certificate verify failed" in unchecked.stderr
        assert unchecked.stderr.count("\n") == 1
        assert cli(control, "apply", "-f", str(m), token=WRITE, ca=str(pem)).returncode == 0
        with ProxyProcess(tmp_path / "proxy", None, "web", "--no-record", "--control-token", SIDECAR,
                          "--control-ca", str(pem), control=control.url).start() as proxy:
            assert config(proxy)["control"]["state"] == "ACK"


@pytest.mark.parametrize("text, message", [
    ("tokens: []\n", "expected a mapping with one key, tokens"),
    ("tokens:\n  - {name: a, token: short, role: write}\n", "at least 32 characters"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, role: admin}}\n", "role must be one of read, write, sidecar"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, token_sha256: {'0' * 64}, role: read}}\n", "exactly one of token"),
    ("tokens:\n  - {name: a, token_sha256: xyz, role: read}\n", "64 hex digits"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, role: read}}\n  - {{name: a, token: {READ}, role: read}}\n",
     "name 'a' is used twice"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, role: read}}\n  - {{name: b, token: {WRITE}, role: read}}\n",
     "the same token as 'a'"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, role: read, service: web}}\n", "service is for a sidecar's token"),
    (f"tokens:\n  - {{name: a, token: {WRITE}, role: read, expires: 1}}\n", "unknown field(s) expires"),
])
def test_a_tokens_file_that_cannot_be_used_is_one_line(tmp_path, text, message):
    f = tmp_path / "tokens.yaml"
    f.write_text(text)
    with pytest.raises(TokenError) as e:
        load_tokens(str(f))
    assert message in str(e.value) and str(e.value).startswith(str(f)) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot read /nonexistent.pem"),
    (["--tokens", "/nonexistent.yaml"], "cannot read tokens file /nonexistent.yaml"),
    (["--ca-cert", "/nonexistent.pem"], "CA: --ca-cert and --ca-key go together"),
    (["--ca-cert", "/nonexistent.pem", "--ca-key", "/nonexistent.key"], "CA: /nonexistent.pem: not a PEM certificate"),
    (["--trust-domain", "Cluster Local"], "--trust-domain 'Cluster Local': lowercase letters"),
])
def test_control_flags_that_cannot_be_used_are_one_line(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "control", "--port", "0", "--store",
                          f"sqlite:{tmp_path / 'c.db'}", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr

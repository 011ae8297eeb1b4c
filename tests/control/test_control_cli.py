"""`meshlens control` with its clients, end to end: a real control-plane process, the real CLI, and bad input."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.control.processes import ControlProcess
from tests.meshlens.policy.test_resources import EXAMPLE

MESH = "services:\n  payment-service:\n    instances: ['127.0.0.1:9001']\n  web: {}\n"


def cli(control: ControlProcess | str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    url = control if isinstance(control, str) else control.url
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    env["MESHLENS_CONTROL"] = url
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=60)


def http(control: ControlProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(control.url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def control(tmp_path):
    with ControlProcess(tmp_path / "control") as c:
        yield c


@pytest.fixture(scope="module")
def untouched(tmp_path_factory):
    """One control plane for the tests that must store nothing: each checks it still holds nothing."""
    with ControlProcess(tmp_path_factory.mktemp("untouched")) as c:
        yield c


@pytest.fixture(scope="module")
def meshed(tmp_path_factory):
    """One control plane holding MESH, for the bad requests: each checks its modes are still MESH's."""
    with ControlProcess(tmp_path_factory.mktemp("meshed")) as c:
        assert cli(c, "apply", "-f", "-", stdin=MESH).returncode == 0
        yield c


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    mesh, example = tmp_path / "mesh.yaml", tmp_path / "payment.yaml"
    mesh.write_text(MESH)
    example.write_text(EXAMPLE)
    return mesh, example


def test_the_tour_apply_the_example_switch_modes_and_read_the_history(control, files):
    mesh, example = files
    out = cli(control, "apply", "-f", str(mesh), "-f", str(example), "--reason", "the payment canary")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["mesh/mesh created", "virtualservice/production/payment-service created",
                                       "destinationrule/default/payment-service created"]
    warnings = out.stderr.splitlines()  # what Istio would read differently from what was meant, said once each
    assert len(warnings) == 2 and all(w.startswith(f"warning: {example}") for w in warnings)
    assert "two hosts" in warnings[0] and "reads it as consecutiveGatewayErrors" in warnings[1]
    assert cli(control, "apply", "-f", str(example)).stdout.splitlines()[0].endswith(" unchanged")
    got = cli(control, "get", "vs", "production/payment-service", "-o", "json")
    assert json.loads(got.stdout)["spec"]["http"][1]["route"][1]["weight"] == 10
    assert "default/payment-service" in cli(control, "get", "destinationrule").stdout
    assert cli(control, "mode", "get").stdout.split() == ["SERVICE", "MODE", "payment-service", "observe", "web", "observe"]
    assert cli(control, "mode", "set", "payment-service", "dry-run", "--reason", "try the retries").stdout == \
        "payment-service: dry-run set (revision 4)\n"
    assert cli(control, "mode", "set", "payment-service", "enforce", "--reason", "dry-run agreed").returncode == 0
    assert cli(control, "mode", "get", "payment-service").stdout.split()[-1] == "enforce"
    history = [re.fullmatch(r"\s*(\d+)  (\S+)  (\S+)  (.*)", line).groups()
               for line in cli(control, "history", "payment-service").stdout.splitlines()]
    assert {who for _, _, who, _ in history} == {_user()}
    assert [what for _, _, _, what in history] == [
        "VirtualService production/payment-service created  (the payment canary)",
        "DestinationRule default/payment-service created  (the payment canary)",
        "mode of payment-service: observe -> dry-run  (try the retries)",
        "mode of payment-service: dry-run -> enforce  (dry-run agreed)"]
    entries = json.loads(cli(control, "history", "-o", "json").stdout)
    assert {e["who"] for e in entries} == {_user()} and [e["revision"] for e in entries] == [1, 2, 3, 4, 5]
    refused = cli(control, "delete", "dr", "payment-service", "--reason", "clean up")  # its subsets are routed to
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and refused.stderr.startswith(
        "meshlens delete: deleting DestinationRule default/payment-service would leave VirtualService "
        "production/payment-service: spec.http[0].route[0].destination.subset: subset 'v2'")
    assert cli(control, "delete", "vs", "production/payment-service", "--reason", "rolled back").returncode == 0
    assert cli(control, "delete", "dr", "payment-service", "--reason", "clean up").returncode == 0
    assert cli(control, "get", "vs").stderr == "no VirtualService stored\n"


def test_a_route_in_one_file_may_name_a_subset_defined_in_another_applied_with_it(control, files, tmp_path):
    mesh, example = files
    vs_text, dr_text = EXAMPLE.split("---\n")
    (tmp_path / "vs.yaml").write_text(vs_text)
    (tmp_path / "dr.yaml").write_text(dr_text)
    alone = cli(control, "apply", "-f", str(tmp_path / "vs.yaml"))
    assert alone.returncode == 2 and "subset 'v2' of payment-service is defined by no DestinationRule" in alone.stderr
    both = cli(control, "apply", "-f", str(tmp_path / "vs.yaml"), "-f", str(tmp_path / "dr.yaml"))
    assert both.returncode == 0 and len(both.stdout.splitlines()) == 2


def _user() -> str:
    import getpass

    return getpass.getuser()


def test_a_restarted_control_plane_keeps_its_resources_revisions_and_history(tmp_path, files):
    c = ControlProcess(tmp_path / "control").start()
    try:
        assert cli(c, "apply", "-f", str(files[0])).returncode == 0
        assert cli(c, "mode", "set", "web", "dry-run", "--reason", "x").returncode == 0
    finally:
        assert c.stop() == 0
        c.kill()
    with ControlProcess(tmp_path / "control") as again:
        assert cli(again, "mode", "get", "web").stdout.split()[-1] == "dry-run"
        assert cli(again, "mode", "set", "web", "enforce", "--reason", "y").stdout == "web: enforce set (revision 3)\n"


def test_a_watcher_is_answered_when_the_revision_passes_its_own(control, files):
    assert cli(control, "apply", "-f", str(files[0])).returncode == 0
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(http(control, "GET", "/v1/watch?after=1&timeout=60")))
    waiter.start()
    assert cli(control, "mode", "set", "web", "dry-run", "--reason", "x").returncode == 0
    waiter.join(60)
    assert got == [(200, {"revision": 2})]
    assert http(control, "GET", "/v1/watch?after=2&timeout=0") == (200, {"revision": 2})


@pytest.mark.parametrize("args, stdin, message", [
    (("apply", "-f", "-"), "kind: Foo\n", "meshlens apply: stdin document 1 (line 1): unknown kind 'Foo'"),
    (("apply", "-f", "-"), "a: [\n", "meshlens apply: stdin line 2: invalid YAML"),
    (("apply", "-f", "-"), "", "meshlens apply: stdin: no documents to apply"),
    (("apply", "-f", "/nonexistent/x.yaml"), None, "meshlens apply: cannot read /nonexistent/x.yaml: No such file"),
    (("get", "gateway"), None, "meshlens get: unknown kind 'gateway'"),
    (("get", "vs", "nope"), None, "meshlens get: no VirtualService 'default/nope'"),
    (("delete", "dr", "nope"), None, "meshlens delete: no DestinationRule 'default/nope'"),
    (("mode", "set", "ghost", "enforce", "--reason", "x"), None,
     "meshlens mode: no service 'ghost' in the mesh (no Mesh is stored: apply one first)"),
    (("history", "--limit", "0"), None, "meshlens history: --limit must be 1 to 1000"),
])
def test_cli_mistakes_are_one_line_and_exit_2_and_store_nothing(untouched, args, stdin, message):
    out = cli(untouched, *args, stdin=stdin)
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert http(untouched, "GET", "/v1/history")[1]["entries"] == []


def test_an_apply_with_one_bad_document_stores_none_of_them(untouched, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH + "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: 3\n")
    out = cli(untouched, "apply", "-f", str(bad))
    assert out.returncode == 2 and "bad.yaml document 2 (line 6): spec must be a mapping" in out.stderr
    assert http(untouched, "GET", "/v1/resources")[1] == {"revision": 0, "items": []}


def test_an_unreachable_control_plane_is_one_line():
    out = cli("http://127.0.0.1:9", "mode", "get")
    assert out.returncode == 2 and out.stderr.startswith("meshlens mode: cannot reach the control plane at "
                                                         "http://127.0.0.1:9: ") and out.stderr.count("\n") == 1
    out = cli("ftp://x", "mode", "get")
    assert out.returncode == 2 and "control plane URL must be http(s)://host:port" in out.stderr


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/v1/apply", b"\xff\xfe", 400, "not UTF-8"),
    ("POST", "/v1/apply", b"kind: [", 400, "invalid YAML"),
    ("POST", "/v1/apply", b"x" * (3 * 1024 * 1024 + 1), 413, "MAX_APPLY_BYTES"),
    ("PUT", "/v1/modes/web", b"{", 400, "expected a JSON body"),
    ("PUT", "/v1/modes/web", b'{"mode": "on"}', 400, "unknown mode 'on'"),
    ("PUT", "/v1/modes/web", b'{"mode": "enforce", "why": 1}', 400, "expected a JSON body"),
    ("PUT", "/v1/modes/Web", b'{"mode": "enforce"}', 400, "is not a service name"),
    ("GET", "/v1/resources/Gateway/x", None, 404, "unknown kind 'Gateway'"),
    ("GET", "/v1/resources?kind=Gateway", None, 400, "unknown kind"),
    ("GET", "/v1/history?limit=many", None, 400, "limit must be a whole number"),
    ("GET", "/v1/watch?after=x", None, 400, "after must be a revision"),
    ("GET", "/v1/watch?timeout=3600", None, 400, "timeout must be 0 to 60"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
    ("GET", "/v1/snapshot?service=web", None, 400, "instance must be"),
    ("GET", "/v1/snapshot?service=we%0Ab&instance=i", None, 400, "service must be"),
    ("GET", "/v1/snapshot?service=web&instance=i&timeout=-1", None, 400, "timeout must be 0 to 60"),
    ("POST", "/v1/status", b"[]", 400, "expected JSON"),
    ("POST", "/v1/status", b'{"service": "web", "instance": "i", "version": "1", "ack": "yes", "error": "", "mode": ""}',
     400, "expected JSON"),
    ("DELETE", "/v1/apply", None, 405, "Method Not Allowed"),
])
def test_bad_requests_get_a_4xx_with_one_line_and_the_control_plane_keeps_serving(meshed, method, path, body, status,
                                                                                 message):
    got_status, got = http(meshed, method, path, body)
    assert got_status == status and message in got["error"] and "\n" not in got["error"]
    assert http(meshed, "GET", "/v1/modes")[1]["modes"] == {"payment-service": "observe", "web": "observe"}


def test_control_refuses_to_listen_beyond_loopback_without_tokens(tmp_path):
    out = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "control", "--host", "0.0.0.0", "--store",
                          f"sqlite:{tmp_path / 'c.db'}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "listens on loopback only" in out.stderr


def test_diff_says_what_an_apply_would_change_and_stores_nothing(control, files, tmp_path):
    mesh, example = files
    first = cli(control, "diff", "-f", str(mesh), "-f", str(example))
    assert first.returncode == 1 and "mesh/mesh would be created" in first.stdout
    assert "+++ applied/virtualservice/production/payment-service" in first.stdout
    assert http(control, "GET", "/v1/history")[1]["entries"] == []  # nothing stored
    assert cli(control, "apply", "-f", str(mesh), "-f", str(example)).returncode == 0
    same = cli(control, "diff", "-f", str(example))
    assert same.returncode == 0 and same.stdout.splitlines() == [
        "virtualservice/production/payment-service unchanged", "destinationrule/default/payment-service unchanged"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.replace("weight: 90\n", "weight: 80\n").replace("weight: 10\n", "weight: 20\n"))
    diff = cli(control, "diff", "-f", str(changed))
    assert diff.returncode == 1 and "virtualservice/production/payment-service would be configured" in diff.stdout
    assert any(line.startswith("-") and "weight: 90" in line for line in diff.stdout.splitlines())
    assert any(line.startswith("+") and "weight: 80" in line for line in diff.stdout.splitlines())
    assert len(http(control, "GET", "/v1/history")[1]["entries"]) == 3  # still only the apply's


@pytest.fixture(scope="module")
def shared_control(tmp_path_factory):
    with ControlProcess(tmp_path_factory.mktemp("fuzzed")) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([("POST", "/v1/apply"), ("PUT", "/v1/modes/web"), ("POST", "/v1/status"),
                        ("POST", "/v1/apply?dry_run=true")]),
       st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                 max_size=4).map(lambda d: json.dumps(d).encode())),
       st.sampled_from(["application/yaml", "application/json", "text/plain"]))
def test_garbage_from_any_client_is_a_4xx_in_one_line_and_the_control_plane_keeps_serving(shared_control, route, body,
                                                                                          content_type):
    method, path = route
    req = urllib.request.Request(shared_control.url + path, data=body, method=method,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, answer = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        status, answer = e.code, json.loads(e.read())
    if status == 200:  # a valid document or report after all: stored, or nothing to say
        return
    assert 400 <= status < 500 and "\n" not in answer["error"], (status, answer)
    assert http(shared_control, "GET", "/v1/modes")[0] == 200

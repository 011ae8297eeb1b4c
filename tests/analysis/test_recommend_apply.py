"""`meshlens recommend --apply | --diff`: the recommendations stored in a real control plane as dry-run, each
policy with its evidence and what-if, idempotent, and refused whole when it cannot be stored as it is."""
from __future__ import annotations

import json
import random

import pytest
import yaml

from meshlens.analysis.proposal import EVIDENCE, OBSERVED, Conflict, Proposal, evidence_of, plan
from meshlens.collector.stores.embedded import EmbeddedStore
from meshlens.mesh import parse
from meshlens.policy.resources import mode_resource
from meshlens.proxy.policies import Policies
from tests.analysis.traffic import CATALOG_TRANSIENT, CATALOG_N, generate
from tests.control.processes import ControlProcess
from tests.control.test_control_cli import cli, http

SERVICES = ["frontend", "catalog", "inventory", "cart", "checkout", "payments", "accounts"]
MESH = yaml.safe_dump({"services": {s: {} for s in SERVICES}})


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("apply") / "chdb"
    s = EmbeddedStore(path)
    generate(s)
    s.close()  # the CLI opens it in its own process
    return f"chdb:{path}"


@pytest.fixture
def control(tmp_path):
    with ControlProcess(tmp_path / "control") as c:
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(MESH)
        assert cli(c, "apply", "-f", str(mesh)).returncode == 0
        yield c


def recommend(control, store_url, *args):
    return cli(control, "recommend", "--store", store_url, *args)


def stored(control, kind, name):
    status, body = http(control, "GET", f"/v1/resources/{kind}/{name}")
    return body["doc"] if status == 200 else None


def test_diff_shows_what_apply_would_store_and_stores_nothing(control, store_url):
    out = recommend(control, store_url, "--service", "catalog", "--diff")
    assert out.returncode == 1, out.stderr
    assert "would: catalog: VirtualService created, DestinationRule created, PeerAuthentication created; " \
           "mode observe -> dry-run" in out.stdout
    assert "+++ applied/virtualservice/default/catalog" in out.stdout and "+  kind: Mode" not in out.stdout
    assert stored(control, "VirtualService", "default/catalog") is None
    assert http(control, "GET", "/v1/modes/catalog")[1]["modes"] == {"catalog": "observe"}


def test_apply_stores_the_policies_with_their_evidence_and_puts_the_service_in_dry_run(control, store_url):
    out = recommend(control, store_url, "--service", "catalog", "--apply", "--reason", "try them")
    assert out.returncode == 0, out.stderr
    assert "catalog: VirtualService created, DestinationRule created, PeerAuthentication created; " \
           "mode observe -> dry-run" in out.stdout
    vs = stored(control, "VirtualService", "default/catalog")
    [entry, rest] = vs["spec"]["http"]
    assert entry["match"][0]["sourceLabels"] == {"app": "frontend"} and entry["retries"]["attempts"] >= 1
    assert rest == {"route": [{"destination": {"host": "catalog"}}]}
    evidence = {e["kind"]: e for e in evidence_of(vs)}
    retry = evidence["retry"]
    # the what-if: the transient 503s the traffic carries, and how many retries would recover
    assert abs(retry["whatif"]["transient_failures"] - CATALOG_N * CATALOG_TRANSIENT) < 0.2 * CATALOG_N * CATALOG_TRANSIENT
    assert retry["whatif"]["recovered"] > 0.9 * retry["whatif"]["transient_failures"]
    assert evidence["timeout"]["whatif"]["cut_ok"] == 0 and retry["evidence"]["n"] == CATALOG_N
    assert http(control, "GET", "/v1/modes/catalog")[1]["modes"] == {"catalog": "dry-run"}
    [entry] = [e for e in http(control, "GET", "/v1/history?service=catalog&kind=Mode")[1]["entries"]]
    assert entry["reason"] == "try them"
    # what the caller's sidecar reads of it: its own rule (sourceLabels), in dry-run
    docs = [stored(control, k, "default/catalog") for k in ("VirtualService", "DestinationRule", "PeerAuthentication")]
    mesh = parse(yaml.safe_load(MESH))
    frontend = Policies.build(mesh, "frontend", {"catalog": "dry-run"}, docs, random.random)
    assert [r.name for r in frontend.outbound["catalog"].routes.rules] == [entry_name(vs), ""]
    other = Policies.build(mesh, "cart", {"catalog": "dry-run"}, docs, random.random)
    assert [r.name for r in other.outbound["catalog"].routes.rules] == [""]

    again = recommend(control, store_url, "--service", "catalog", "--apply")
    assert again.returncode == 0, again.stderr
    assert "catalog: policies unchanged; mode dry-run (kept)" in again.stdout
    assert "nothing to apply" in again.stdout
    assert stored(control, "VirtualService", "default/catalog") == vs


def entry_name(vs):
    return vs["spec"]["http"][0]["name"]


def test_a_changed_policy_of_a_service_in_enforce_goes_back_to_dry_run(control, store_url):
    assert recommend(control, store_url, "--service", "catalog", "--apply").returncode == 0
    assert cli(control, "mode", "set", "catalog", "enforce", "--reason", "r", "--force").returncode == 0  # STRICT: no calls store
    vs = stored(control, "VirtualService", "default/catalog")
    vs["spec"]["http"][0]["timeout"] = "9s"  # what an earlier recommendation said
    assert http(control, "POST", "/v1/apply", yaml.safe_dump(vs).encode())[0] == 200
    out = recommend(control, store_url, "--service", "catalog", "--apply")
    assert "catalog: VirtualService changed; mode enforce -> dry-run" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("args, message", [
    (["--service", "search-v2"], "the control plane's mesh does not define 'search-v2'"),
    ([], "the control plane's mesh does not define notifications"),  # every callee with a policy must be known
])
def test_a_service_the_control_plane_does_not_know_is_one_line_and_nothing_changes(control, store_url, args, message):
    before = http(control, "GET", "/v1/history")[1]["revision"]
    out = recommend(control, store_url, *args, "--apply")
    assert out.returncode != 0 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert http(control, "GET", "/v1/history")[1]["revision"] == before


def test_a_document_written_by_hand_is_not_replaced(control, store_url, tmp_path):
    mine = tmp_path / "vs.yaml"
    mine.write_text("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: catalog}\n"
                    "spec:\n  hosts: [catalog]\n  http:\n  - route:\n    - destination: {host: catalog}\n")
    assert cli(control, "apply", "-f", str(mine)).returncode == 0
    out = recommend(control, store_url, "--service", "catalog", "--apply")
    assert out.returncode != 0 and "VirtualService default/catalog is stored and was not written by meshlens " \
                                   "recommend" in out.stderr
    assert http(control, "GET", "/v1/modes/catalog")[1]["modes"] == {"catalog": "observe"}


def test_no_control_plane_is_one_line(store_url):
    out = cli("http://127.0.0.1:9", "recommend", "--store", store_url, "--apply")
    assert out.returncode != 0 and "cannot reach the control plane" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_plan_in_observe_with_the_same_policies_stored_goes_to_dry_run() -> None:
    doc = {"kind": "DestinationRule", "spec": {"host": "a"},
           "metadata": {"name": "a", "annotations": {"meshlens.io/recommended": "{}", EVIDENCE: "[]"}}}
    props = {"a": Proposal("a", "default", [doc])}
    p = plan(props, {("DestinationRule", "default/a"): doc}, {"a": "observe"}, {"a"},
             lambda s, m: mode_resource(s, m).doc)
    assert [d["kind"] for d in p.documents] == ["Mode"] and p.said == ["a: policies unchanged; mode observe -> dry-run"]
    with pytest.raises(Conflict, match="does not define a"):
        plan(props, {}, {}, {"b"}, lambda s, m: None)
    assert OBSERVED  # the observe figures' annotation: written only where observe calls exist

"""mesh.yaml: transcripts of documents in, services and lookups (or one-line errors) out."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.mesh import MeshError, load, parse, parse_address

DOC = """
services:
  catalog:
    instances:
      - address: 10.0.0.5:8080
        labels: {version: v1}
      - address: "[FD00::7]:8080"
        labels: {version: v2, canary: true}
    subsets:
      v1: {version: v1}
      v2: {version: v2}
  payment:
    protocol: tcp
    mode: observe
    load_balancer: LEAST_REQUEST
    instances: ["10.0.0.9:9090"]
  batch:
"""


def test_a_mesh_file_names_services_instances_and_subsets(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(DOC)
    mesh = load(f)
    assert sorted(mesh.services) == ["batch", "catalog", "payment"]
    assert mesh.name_of("10.0.0.5", 8080) == ("catalog", "v1")
    assert mesh.name_of("fd00:0::7", 8080) == ("catalog", "v2")  # IPv6 compared canonically
    assert mesh.name_of("10.0.0.9", 9090) == ("payment", "")
    assert mesh.name_of("10.0.0.5", 9999) == ("10.0.0.5:9999", "")  # unknown: recorded as it is
    assert mesh.name_of("fd00::8", 80) == ("[fd00::8]:80", "")
    pay = mesh.service("payment")
    assert (pay.protocol, pay.mode, pay.load_balancer) == ("tcp", "observe", "LEAST_REQUEST")
    cat = mesh.service("catalog")
    assert (cat.protocol, cat.mode, cat.load_balancer) == (None, "observe", "ROUND_ROBIN")  # the defaults
    assert mesh.declared_protocol("10.0.0.9", 9090) == "tcp"  # what the proxy and the tap ask
    assert mesh.declared_protocol("10.0.0.5", 8080) is None  # not declared: sniffed
    assert mesh.declared_protocol("10.0.0.99", 80) is None  # not in the mesh
    assert mesh.service("batch").instances == ()
    cat = mesh.service("catalog")
    assert cat.instances[1].labels == {"version": "v2", "canary": "true"}
    assert cat.instances[1].address == "[fd00::7]:8080"


@pytest.mark.parametrize("doc, message", [
    ("services: [a, b]", "services: expected a mapping"),
    ("service: {}", "unknown field(s) service"),
    ("services: {a: {protocol: quic}}", "services.a.protocol: expected one of http, http2, grpc, tcp, tls, got "
                                        "'quic'"),
    ("services: {a: {mode: on}}", "services.a.mode: expected observe, got True"),
    ("services: {catalog: {mode: dry-run}}", "services.catalog.mode: dry-run is set through the control plane "
                                             "(meshlens mode set SERVICE dry-run), not in the mesh file"),
    ("services: {a: {mode: enforce}}", "services.a.mode: enforce is set through the control plane"),
    ("services: {a: {timeout: 3s}}", "services.a: unknown field(s) timeout (expected: instances, load_balancer, "
                                     "mode, namespace, protocol, service_account, subsets)"),
    ("services: {a: {namespace: Shop}}", "services.a.namespace: 'Shop' must be a DNS label"),
    ("services: {a: {service_account: 7}}", "services.a.service_account: 7 must be a DNS label"),
    ("services: {a: {load_balancer: least_request}}",
     "services.a.load_balancer: expected one of ROUND_ROBIN, LEAST_REQUEST, got 'least_request'"),
    ("services: {a: {load_balancer: {simple: LEAST_REQUEST}}}", "services.a.load_balancer: expected one of "
                                                                "ROUND_ROBIN, LEAST_REQUEST, got {'simple': "),
    ("services: {a: {load_balancer: LEAST_CONN}}",
     "services.a.load_balancer: LEAST_CONN is Istio's deprecated name for LEAST_REQUEST: use LEAST_REQUEST"),
    ("services: {a: {load_balancer: RANDOM}}", "services.a.load_balancer: RANDOM is not available yet"),
    ("version: 1\nservices: {}", "unknown field(s) version (expected: services)"),
    ("services: {a: {retries: 3}}", "services.a: unknown field(s) retries"),
    ("services: {a: {instances: [10.0.0.1]}}", "services.a.instances[0].address: expected 'host:port'"),
    ("services: {a: {instances: ['10.0.0.1:0']}}", "port must be 1..65535"),
    ("services: {a: {instances: ['fd00::1:80']}}", "IPv6 in brackets"),
    ("services: {a: {instances: [{address: '1.2.3.4:80', weight: 2}]}}", "unknown field(s) weight"),
    ("services: {a: {subsets: {v1: [x]}}}", "services.a.subsets.v1: expected a mapping"),
    ("services: {a: {instances: ['1.2.3.4:80']}, b: {instances: ['1.2.3.4:80']}}", "listed under both"),
    ("services: {'a b': {}}", "service names use"),
])
def test_bad_mesh_documents_are_refused_with_the_path_to_the_problem(tmp_path: Path, doc: str, message: str) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(doc)
    with pytest.raises(MeshError) as err:
        load(f)
    assert message in str(err.value) and str(f) in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="cannot read mesh file"):
        load(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("services:\n  a: [\n")
    with pytest.raises(MeshError, match=r"line \d+: invalid YAML"):
        load(f)


def test_unknown_service_names_the_known_ones() -> None:
    with pytest.raises(MeshError, match=r"no service 'x' in the mesh \(known: a\)"):
        parse({"services": {"a": None}}).service("x")


def test_addresses() -> None:
    assert parse_address("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_address("[::1]:443") == ("::1", 443)
    assert parse_address("Catalog.svc:8080") == ("catalog.svc", 8080)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["services", "x"]), yaml_values, max_size=2) | yaml_values)
def test_any_document_is_a_mesh_or_a_mesh_error(doc) -> None:
    try:
        parse(doc)
    except MeshError:
        pass


def test_service_at_names_the_one_service_on_an_ip_whatever_the_port() -> None:
    mesh = parse({"services": {
        "a": {"instances": ["10.200.0.1:8080", "10.200.0.1:9090"]},
        "b": {"instances": ["10.200.0.2:8080", "[fd00::2]:8080"]},
        "c": {"instances": ["127.0.0.1:7001"]},
        "d": {"instances": ["127.0.0.1:7002"]},
    }})
    assert mesh.service_at("10.200.0.1") == "a"
    assert mesh.service_at("fd00:0::2") == "b"  # canonical form, as name_of
    assert mesh.service_at("10.200.0.9") is None  # unmeshed caller
    assert mesh.service_at("127.0.0.1") is None  # two services there: the address names no one


def test_a_services_identity_is_its_namespace_and_service_account_defaulting_to_default_and_its_name():
    mesh = parse({"services": {"catalog": {"namespace": "shop", "service_account": "catalog-sa"}, "web": {}}})
    assert (mesh.service("catalog").namespace, mesh.service("catalog").identity_account) == ("shop", "catalog-sa")
    assert (mesh.service("web").namespace, mesh.service("web").identity_account) == ("default", "web")

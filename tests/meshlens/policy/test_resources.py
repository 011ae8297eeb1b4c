"""Documents as the control plane reads them: kinds, versions, names, and errors that name the document and line."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from meshlens.policy.resources import KINDS, ResourceError, parse_documents

EXAMPLE = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: payment-service
  namespace: production
spec:
  hosts:
    - payment-service
  http:
    - match:
        - headers:
            x-user-type:
              exact: beta-tester
      route:
        - destination:
            host: payment-service
            subset: v2
          weight: 100
    - route:
        - destination:
            host: payment-service
            subset: v1
          weight: 90
        - destination:
            host: payment-service
            subset: v2
          weight: 10
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: payment-service
spec:
  host: payment-service
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        http1MaxPendingRequests: 50
        maxRequestsPerConnection: 2
    outlierDetection:
      consecutiveErrors: 5
      interval: 30s
      baseEjectionTime: 30s
  subsets:
    - name: v1
      labels:
        version: v1
    - name: v2
      labels:
        version: v2
"""


def test_the_issue_example_is_read_unchanged_as_two_resources():
    vs, dr = parse_documents(EXAMPLE, "payment.yaml")
    assert (vs.kind, vs.name, dr.kind, dr.name) == ("VirtualService", "production/payment-service",
                                                    "DestinationRule", "default/payment-service")
    assert vs.doc["spec"]["http"][1]["route"][0]["weight"] == 90
    assert dr.doc["spec"]["trafficPolicy"]["outlierDetection"]["consecutiveErrors"] == 5


@pytest.mark.parametrize("version", ["networking.istio.io/v1alpha3", "networking.istio.io/v1beta1",
                                     "networking.istio.io/v1"])
def test_every_version_istio_serves_is_accepted(version):
    [res] = parse_documents(f"apiVersion: {version}\nkind: DestinationRule\nmetadata: {{name: a}}\nspec: {{host: a}}\n",
                            "f")
    assert res.name == "default/a"


def test_a_mesh_yaml_as_people_have_it_is_a_mesh_and_empty_documents_are_skipped():
    docs = parse_documents("---\nservices:\n  pay:\n    instances: ['10.0.0.1:80']\n---\n---\n", "mesh.yaml")
    assert [(d.kind, d.name) for d in docs] == [("Mesh", "mesh")]


@pytest.mark.parametrize("text, message", [
    ("kind: Foo\n", "f document 1 (line 1): unknown kind 'Foo'"),
    ("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: a}\nspec: {}\n",
     "VirtualService apiVersion must be one of"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: {}\n", "metadata.name is required"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: Pay}\nspec: {}\n",
     "metadata.name 'Pay' must be lowercase"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, uid: 1}\nspec: {}\n",
     "unknown field(s) in metadata: uid"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: [1]\n",
     "spec must be a mapping"),
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {}\nstatus: {}\n",
     "unknown field(s) status"),
    ("apiVersion: meshlens.io/v1alpha1\nkind: Mode\nmetadata: {name: pay}\nspec: {mode: enforcing}\n",
     "spec must be {mode: observe | dry-run | enforce}"),
    ("services:\n  pay:\n    instances: [nowhere]\n", "services.pay"),
    ("- 1\n", "expected a mapping with apiVersion"),
    ("a: [\n", "f line 2: invalid YAML"),
    ("apiVersion: meshlens.io/v1alpha1\nkind: Mode\nmetadata: {name: pay}\nspec: {mode: observe}\n---\n"
     "apiVersion: meshlens.io/v1alpha1\nkind: Mode\nmetadata: {name: pay}\nspec: {mode: enforce}\n",
     "f document 2 (line 6): Mode pay is also document 1"),
])
def test_bad_documents_are_one_line_naming_the_document_and_line(text, message):
    with pytest.raises(ResourceError) as e:
        parse_documents(text, "f")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_line_of_a_later_document_is_its_own():
    with pytest.raises(ResourceError, match=r"document 2 \(line 6\): unknown kind"):
        parse_documents("services:\n  a: {}\n\n\n---\nkind: Nope\n", "f")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_read_or_refused_in_one_line(text):
    try:
        docs = parse_documents(text, "fuzz")
    except ResourceError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz")
    else:
        assert all(d.kind in KINDS for d in docs)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12),
       st.sampled_from(KINDS))
def test_any_spec_of_any_kind_is_read_or_refused_in_one_line(spec, kind):
    import yaml

    version = {"VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1",
               "PeerAuthentication": "security.istio.io/v1", "AuthorizationPolicy": "security.istio.io/v1"}.get(
        kind, "meshlens.io/v1alpha1")
    text = yaml.safe_dump({"apiVersion": version, "kind": kind, "metadata": {"name": "a"}, "spec": spec})
    try:
        parse_documents(text, "fuzz")
    except ResourceError as e:
        assert "\n" not in str(e)

"""VirtualService and DestinationRule checked as Istio reads them: fields by name and line, semantics, warnings."""
from __future__ import annotations

import pytest

from meshlens.policy.spec import duration_s
from meshlens.policy.resources import ResourceError, check_references, parse_documents
from tests.meshlens.policy.test_resources import EXAMPLE

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay}
spec:
  hosts: [pay]
  http:
    - route:
        - destination: {host: pay}
"""
DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay}
spec:
  host: pay
"""


def vs(http: str) -> str:
    return VS.replace("  http:\n    - route:\n        - destination: {host: pay}\n", "  http:\n" + http)


def test_the_example_is_accepted_unchanged_with_what_istio_would_read_differently_said():
    docs = parse_documents(EXAMPLE, "payment.yaml")
    [vs_warn] = check_references(docs)[("VirtualService", "production/payment-service")]
    assert vs_warn.startswith("payment.yaml document 1: spec.http[0].route[0].destination.subset (line 17): Istio would "
                              "read 'payment-service' here as payment-service.production.svc.cluster.local")
    [dr_warn] = docs[1].warnings
    assert dr_warn.startswith("payment.yaml document 2: spec.trafficPolicy.outlierDetection.consecutiveErrors (line 43): "
                              "is deprecated") and "consecutiveGatewayErrors" in dr_warn


@pytest.mark.parametrize("http, message", [
    ("    - route:\n        - destination: {host: pay, subset: v1}\n          weight: 90\n"
     "        - destination: {host: pay, subset: v2}\n          weight: 20\n",
     "spec.http[0].route (line 7): weights add up to 110, not 100"),
    ("    - route:\n        - destination: {host: pay}\n          weight: 101\n",
     "spec.http[0].route[0].weight (line 9): must be 0 to 100"),
    ("    - route:\n        - destination: {host: pay}\n          weight: -1\n",
     "spec.http[0].route[0].weight (line 9): must be a whole number of 0 or more"),
    ("    - match:\n        - uri: {exact: /a, prefix: /}\n      route:\n        - destination: {host: pay}\n",
     "spec.http[0].match[0].uri (line 8): must hold exactly one of exact, prefix, regex (has exact, prefix)"),
    ("    - match:\n        - uri: {regex: '/a(?=b)'}\n      route:\n        - destination: {host: pay}\n",
     "spec.http[0].match[0].uri.regex (line 8): '/a(?=b)' is not an RE2 regular expression"),
    ("    - route:\n        - destination: {host: pay}\n      retries: {attemps: 3}\n",
     "spec.http[0].retries.attemps (line 9): unknown field (known here: attempts, perTryTimeout, retryOn"),
    ("    - route:\n        - destination: {host: pay}\n      timeout: 30\n",
     "spec.http[0].timeout (line 9): 30 is not a duration"),
    ("    - route:\n        - destination: {host: pay}\n      fault: {abort: {httpStatus: 42}}\n",
     "spec.http[0].fault.abort.httpStatus (line 9): must be an HTTP status code"),
    ("    - route:\n        - destination: {host: pay}\n      mirrorPercentage: {value: 200}\n",
     "spec.http[0].mirrorPercentage.value (line 9): must be a number from 0 to 100"),
    ("    - route:\n        - weight: 100\n", "spec.http[0].route[0] (line 8): destination.host is required"),
    ("    - timeout: 1s\n", "spec.http[0] (line 7): needs a route"),
    ("    - route:\n        - destination: {host: pay}\n      retries: {attempts: 2, retryOn: '5xx,gatway-error'}\n",
     "spec.http[0].retries.retryOn (line 9): 'gatway-error' is not a retry condition (known: 5xx, cancelled"),
])
def test_a_virtual_service_istio_would_refuse_is_refused_naming_the_field_and_line(http, message):
    with pytest.raises(ResourceError) as e:
        parse_documents(vs(http), "vs.yaml")
    assert str(e.value).startswith("vs.yaml document 1: " + message), str(e.value)


@pytest.mark.parametrize("policy, message", [
    ("  trafficPolicy:\n    outlierDetection: {consecutiveErrors: 5, consecutiveGatewayErrors: 5}\n",
     "spec.trafficPolicy.outlierDetection.consecutiveErrors (line 7): is deprecated and consecutiveGatewayErrors"),
    ("  trafficPolicy:\n    loadBalancer: {simple: FASTEST}\n", "spec.trafficPolicy.loadBalancer.simple (line 7): must be one of"),
    ("  trafficPolicy:\n    outlierDetection: {maxEjectionPercent: 150}\n",
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent (line 7): is a percentage"),
    ("  trafficPolicy:\n    connectionPool: {http: {http1MaxPendingRequest: 5}}\n",
     "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequest (line 7): unknown field"),
    ("  subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v1, labels: {version: v2}}\n",
     "spec.subsets[1].name (line 8): subset 'v1' is defined twice"),
    ("  subsets:\n    - labels: {version: v1}\n", "spec.subsets[0].name (line 7): is required"),
])
def test_a_destination_rule_istio_would_refuse_is_refused_naming_the_field_and_line(policy, message):
    with pytest.raises(ResourceError) as e:
        parse_documents(DR + policy, "dr.yaml")
    assert str(e.value).startswith("dr.yaml document 1: " + message), str(e.value)


def test_fields_istio_has_and_meshlens_does_not_enforce_yet_are_stored_with_a_warning():
    [res] = parse_documents(vs("    - route:\n        - destination: {host: pay}\n      corsPolicy: {allowOrigins: []}\n"),
                            "vs.yaml")
    assert res.warnings == ("vs.yaml document 1: spec.http[0].corsPolicy (line 9): is not enforced by meshlens yet: "
                            "stored as written",)


def test_header_presence_and_every_string_match_are_read():
    [res] = parse_documents(vs("    - match:\n        - headers: {x-canary: {}, x-user: {prefix: beta}}\n"
                               "          queryParams: {v: {regex: '[0-9]+'}}\n          method: {exact: GET}\n"
                               "      route:\n        - destination: {host: pay}\n"), "vs.yaml")
    assert res.warnings == ()


def test_a_subset_no_destination_rule_defines_is_refused_across_documents():
    docs = parse_documents(vs("    - route:\n        - destination: {host: pay, subset: v9}\n"), "vs.yaml")
    docs += parse_documents(DR + "  subsets:\n    - {name: v1, labels: {version: v1}}\n", "dr.yaml")
    with pytest.raises(ResourceError, match=r"vs.yaml document 1: spec.http\[0\].route\[0\].destination.subset "
                                            r"\(line 8\): subset 'v9' of pay is defined by no DestinationRule"):
        check_references(docs)


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("1m30s", 90), ("100ms", 0.1), ("1.5h", 5400), ("250us", 0.00025)])
def test_durations_are_read_as_go_and_istio_write_them(text, seconds):
    assert duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "s", "1d", "-1s", "1 s", ""])
def test_what_is_not_a_duration_is_refused(text):
    with pytest.raises(ValueError, match="is not a duration"):
        duration_s(text)


def test_what_istio_would_do_nothing_with_or_meshlens_does_not_enforce_is_said():
    [v] = parse_documents(vs("    - route:\n        - destination: {host: pay}\n"
                             "      fault: {abort: {httpStatus: 503}}\n      retries: {retryOn: '503,reset'}\n"), "vs.yaml")
    assert v.warnings == ("vs.yaml document 1: spec.http[0].fault.abort (line 9): has no percentage: Istio injects it "
                          "into no request (give percentage.value: 100 for every one)",)
    [d] = parse_documents(DR + "  subsets:\n    - name: v1\n      labels: {version: v1}\n"
                               "      trafficPolicy: {loadBalancer: {simple: RANDOM}}\n", "dr.yaml")
    assert any("subsets[0].trafficPolicy" in w and "not enforced by meshlens yet (the DestinationRule's own" in w
               for w in d.warnings), d.warnings

"""A snapshot's documents read into what the sidecar applies: per destination in dry-run or enforce, none in observe."""
from __future__ import annotations

import random

import pytest
import yaml

from meshlens.mesh import parse
from meshlens.proxy.policies import Policies
from tests.meshlens.policy.test_resources import EXAMPLE

MESH = parse({"services": {"web": {}, "payment-service": {"instances": [
    {"address": "10.0.0.1:80", "labels": {"version": "v1"}}, {"address": "10.0.0.2:80", "labels": {"version": "v2"}}]}}})
DOCS = list(yaml.safe_load_all(EXAMPLE))


def test_the_example_read_for_a_caller_of_payment_service_in_enforce() -> None:
    pol = Policies.build(MESH, "web", {"payment-service": "enforce"}, DOCS, random.Random(1).random)
    dest = pol.outbound["payment-service"]
    assert dest.mode == "enforce" and pol.inbound is None
    assert [p.name for p in dest.chain.policies] == ["pool", "outlier", "retry"]  # only what the documents ask for
    assert dest.routes is not None and dest.routes.source == "production/payment-service"
    assert [r.destinations for r in dest.routes.rules] == [(("payment-service", "v2", 100),),
                                                           (("payment-service", "v1", 90), ("payment-service", "v2", 10))]
    assert (dest.limits.max_connections, dest.limits.max_pending, dest.limits.max_requests_per_connection) == (100, 50, 2)
    assert dest.outlier is not None and dest.outlier.config.consecutive_gateway == 5
    assert pol.subsets["payment-service"] == {"v1": {"version": "v1"}, "v2": {"version": "v2"}}


def test_observe_builds_nothing_and_the_outlier_state_survives_a_snapshot_that_keeps_its_settings() -> None:
    observe = Policies.build(MESH, "web", {}, DOCS, random.random)
    assert observe.outbound == {} and observe.inbound is None
    first = Policies.build(MESH, "web", {"payment-service": "dry-run"}, DOCS, random.random)
    again = Policies.build(MESH, "web", {"payment-service": "enforce"}, DOCS, random.random, first)
    assert again.outbound["payment-service"].outlier is first.outbound["payment-service"].outlier
    assert again.outbound["payment-service"].breaker is first.outbound["payment-service"].breaker  # counts go on


def test_a_document_that_does_not_read_is_refused_naming_it() -> None:
    bad = [dict(DOCS[0], spec={**DOCS[0]["spec"], "hosts": []})]
    with pytest.raises(ValueError, match=r"snapshot policy 1: spec.hosts: at least one host is required"):
        Policies.build(MESH, "web", {"payment-service": "enforce"}, bad, random.random)


def test_source_labels_keep_the_rules_and_blocks_for_this_caller_only() -> None:
    """Istio's sourceLabels name the caller's workload: the caller's sidecar keeps what names it."""
    vs = {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService", "metadata": {"name": "pay"},
          "spec": {"hosts": ["payment-service"], "http": [
              {"name": "cart-only", "match": [{"uri": {"exact": "/charge"}, "sourceLabels": {"app": "cart"}}],
               "timeout": "1s", "route": [{"destination": {"host": "payment-service"}}]},
              {"name": "web-or-v2", "match": [{"uri": {"prefix": "/a"}, "sourceLabels": {"app": "cart"}},
                                              {"uri": {"prefix": "/b"}, "sourceLabels": {"app": "web", "version": "v2"}}],
               "route": [{"destination": {"host": "payment-service"}}]},
              {"name": "everyone", "route": [{"destination": {"host": "payment-service"}}]}]}}
    web = Policies.build(MESH, "web", {"payment-service": "enforce"}, [vs], random.random, labels={"version": "v2"})
    rules = web.outbound["payment-service"].routes.rules
    assert [r.name for r in rules] == ["web-or-v2", "everyone"]
    assert rules[0].matches(_head(b"GET /b HTTP/1.1\r\nHost: payment-service\r\n\r\n"))
    assert not rules[0].matches(_head(b"GET /a HTTP/1.1\r\nHost: payment-service\r\n\r\n"))  # cart's block is gone
    v1 = Policies.build(MESH, "web", {"payment-service": "enforce"}, [vs], random.random, labels={"version": "v1"})
    assert [r.name for r in v1.outbound["payment-service"].routes.rules] == ["everyone"]
    cart = Policies.build(MESH, "cart", {"payment-service": "enforce"}, [vs], random.random)
    assert [r.name for r in cart.outbound["payment-service"].routes.rules] == ["cart-only", "web-or-v2", "everyone"]
    assert [p.name for p in cart.outbound["payment-service"].chain.policies] == ["timeout", "retry"]


def _head(raw: bytes):
    from tests.proxy.test_routing import head

    return head(raw)

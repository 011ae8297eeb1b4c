"""AuthorizationPolicy evaluated as Istio does: which policies apply to a service, DENY before ALLOW, no ALLOW
policy allows all, one ALLOW policy allows only what it names, AUDIT decides nothing, dry-run only records."""
from __future__ import annotations

import pytest

from meshlens.policy.security import CONDITION_KEYS
from meshlens.proxy.authz import Request, applicable, compile_policy, condition_getter, decide
from tests.proxy.test_routing import head

GET = head(b"GET /pay/1?x=2 HTTP/1.1\r\nHost: Payments.shop\r\nX-User-Type: beta-tester\r\n\r\n")
POST = head(b"POST /admin/users HTTP/1.1\r\nHost: payments\r\nContent-Length: 0\r\n\r\n")
MTLS = "cluster.local/ns/shop/sa/web"


def policy(action: str, *rules: dict, dry_run: bool = False, name: str = "shop/p"):
    meta = {"annotations": {"istio.io/dry-run": "true"}} if dry_run else {}
    return compile_policy(name, {"metadata": meta, "spec": {"action": action, "rules": list(rules)}})


def verdict(policies, h=GET, principal="", ip="10.0.0.7", port=8080, dry_run=False):
    return decide(tuple(policies), Request(h, ip, port, principal), dry_run)


def test_with_no_policy_or_no_allow_policy_everything_not_denied_is_allowed():
    assert not verdict([]).deny
    deny_admin = policy("DENY", {"to": [{"operation": {"paths": ["/admin*"]}}]})
    assert not verdict([deny_admin]).deny and verdict([deny_admin], POST).deny
    assert verdict([deny_admin], POST).policy == "shop/p"


def test_with_an_allow_policy_only_what_it_allows_goes_and_deny_comes_first():
    allow_get = policy("ALLOW", {"to": [{"operation": {"methods": ["GET"]}}]}, name="shop/allow-get")
    assert not verdict([allow_get]).deny
    v = verdict([allow_get], POST)
    assert v.deny and v.policy == "no ALLOW policy matched"
    deny_beta = policy("DENY", {"when": [{"key": "request.headers[x-user-type]", "values": ["beta-*"]}]})
    assert verdict([allow_get, deny_beta]).deny  # DENY before ALLOW
    assert not verdict([policy("ALLOW", {})], POST).deny  # an empty rule matches everything
    assert verdict([compile_policy("shop/none", {"spec": {}})]).deny  # an ALLOW with no rules allows nothing


@pytest.mark.parametrize("rule, request_, expected", [
    ({"to": [{"operation": {"hosts": ["payments.*"]}}]}, {}, True),  # hosts: case-blind, prefix
    ({"to": [{"operation": {"paths": ["/pay/1"]}}]}, {}, True),  # the path without its query
    ({"to": [{"operation": {"notPaths": ["/pay/*"]}}]}, {}, False),
    ({"to": [{"operation": {"ports": ["8080"]}}]}, {}, True),
    ({"to": [{"operation": {"ports": ["9090"]}}]}, {}, False),
    ({"to": [{"operation": {"methods": ["POST"]}}, {"operation": {"paths": ["*1"]}}]}, {}, True),  # one operation
    ({"to": [{"operation": {"methods": ["GET"], "paths": ["/admin*"]}}]}, {}, False),  # every field of one
    ({"from": [{"source": {"principals": [MTLS]}}]}, {"principal": MTLS}, True),
    ({"from": [{"source": {"principals": ["*"]}}]}, {}, False),  # plaintext: no principal at all
    ({"from": [{"source": {"notPrincipals": [MTLS]}}]}, {}, True),
    ({"from": [{"source": {"namespaces": ["shop"]}}]}, {"principal": MTLS}, True),
    ({"from": [{"source": {"serviceAccounts": ["shop/web"]}}]}, {"principal": MTLS}, True),
    ({"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}, {}, True),
    ({"from": [{"source": {"notIpBlocks": ["10.0.0.7"]}}]}, {}, False),
    ({"from": [{"source": {"requestPrincipals": ["*"]}}]}, {}, False),  # JWT: never verified here
    ({"when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]}, {}, True),
    ({"when": [{"key": "request.headers[X-User-Type]", "notValues": ["beta-tester"]}]}, {}, False),
    ({"when": [{"key": "request.auth.claims[iss]", "values": ["*"]}]}, {}, False),  # unknown: never matches
])
def test_what_a_rule_matches(rule, request_, expected):
    assert verdict([policy("DENY", rule)], **request_).deny is expected


def test_dry_run_policies_and_a_dry_run_service_record_what_they_would_deny():
    deny_all = policy("DENY", {}, dry_run=True)
    v = verdict([deny_all])
    assert not v.deny and v.would_deny
    enforced = policy("DENY", {"to": [{"operation": {"methods": ["POST"]}}]})
    assert verdict([deny_all, enforced], POST).deny  # an enforced DENY still denies beside a dry-run one
    assert verdict([enforced], POST, dry_run=True) == verdict([enforced], POST, dry_run=True)
    v = verdict([enforced], POST, dry_run=True)
    assert not v.deny and v.would_deny and v.policy == "shop/p"
    audit = policy("AUDIT", {"to": [{"operation": {"methods": ["GET"]}}]})
    v = verdict([audit])
    assert v.audited and not v.deny and not v.would_deny


def test_which_policies_apply_namespace_selector_and_the_root_namespace():
    doc = {"spec": {"selector": {"matchLabels": {"app": "payments", "version": "v2"}}}}
    assert applicable("shop/p", doc, "shop", {"app": "payments", "version": "v2"})
    assert not applicable("shop/p", doc, "shop", {"app": "payments", "version": "v1"})
    assert not applicable("other/p", doc, "shop", {"app": "payments", "version": "v2"})
    assert applicable("shop/p", {"spec": {}}, "shop", {"app": "x"})
    assert applicable("istio-system/p", {"spec": {}}, "shop", {})
    assert not applicable("istio-system/p", doc, "shop", {"app": "payments"})


def test_the_keys_the_policy_checks_know_are_the_keys_the_sidecar_evaluates():
    for key in CONDITION_KEYS:
        assert condition_getter(key) is not None, key
    assert condition_getter("request.headers[x-a]") is not None and condition_getter("request.auth.claims[x]") is None


def test_peer_authentication_precedence_workload_then_namespace_then_mesh_unset_inherits():
    from meshlens.proxy.authz import peer_authentication

    def pa(name, mode, selector=None, ports=None):
        spec = {"mtls": {"mode": mode}}
        if selector:
            spec["selector"] = {"matchLabels": selector}
        if ports:
            spec["portLevelMtls"] = {str(p): {"mode": m} for p, m in ports.items()}
        return name, {"spec": spec}

    labels = {"app": "api"}
    assert peer_authentication([], "shop", labels) == ("PERMISSIVE", {})
    mesh_strict = pa("istio-system/default", "STRICT")
    assert peer_authentication([mesh_strict], "shop", labels)[0] == "STRICT"
    ns_permissive = pa("shop/default", "PERMISSIVE")
    assert peer_authentication([mesh_strict, ns_permissive], "shop", labels)[0] == "PERMISSIVE"
    workload_unset = pa("shop/api", "UNSET", {"app": "api"}, {8080: "DISABLE", 9090: "UNSET"})
    assert peer_authentication([mesh_strict, ns_permissive, workload_unset], "shop", labels) == (
        "PERMISSIVE", {8080: "DISABLE", 9090: "PERMISSIVE"})
    other = pa("shop/web", "DISABLE", {"app": "web"})
    assert peer_authentication([mesh_strict, other], "shop", labels)[0] == "STRICT"
    assert peer_authentication([pa("other/default", "DISABLE")], "shop", labels)[0] == "PERMISSIVE"

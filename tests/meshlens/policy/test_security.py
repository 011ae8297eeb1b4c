"""PeerAuthentication, AuthorizationPolicy and LocalRateLimit checked as their APIs read them, and said to be
stored but not enforced yet."""
from __future__ import annotations

import pytest

from meshlens.policy.resources import ResourceError, parse_documents

PA = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n"
AP = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: pay}\nspec:\n"
RL = "apiVersion: meshlens.io/v1alpha1\nkind: LocalRateLimit\nmetadata: {name: pay}\nspec:\n"


def test_what_istios_docs_show_is_accepted_and_enforced_without_a_warning():
    [pa] = parse_documents(PA + "  mtls: {mode: STRICT}\n", "pa.yaml")
    [ap] = parse_documents(AP + "  selector: {matchLabels: {app: pay}}\n  action: ALLOW\n  rules:\n"
                                "    - from: [{source: {principals: ['cluster.local/ns/shop/sa/web']}}]\n"
                                "      to: [{operation: {methods: [GET], paths: ['/pay/*']}}]\n"
                                "      when: [{key: 'request.headers[x-user-type]', values: [beta-tester]}]\n", "ap.yaml")
    [rl] = parse_documents(RL + "  tokenBucket: {maxTokens: 100, tokensPerFill: 100, fillInterval: 1s}\n", "rl.yaml")
    assert pa.name == "shop/default" and ap.name == "default/pay" and rl.name == "pay"
    assert pa.warnings == () and ap.warnings == () and rl.warnings == ()  # the sidecars enforce all three
    [jwt] = parse_documents(AP + "  rules:\n    - from: [{source: {requestPrincipals: ['*']}}]\n"
                                 "      when: [{key: 'request.auth.claims[iss]', values: [x]}]\n", "jwt.yaml")
    assert [w.split(": ", 2)[2] for w in jwt.warnings] == [
        "JWT principals are not verified by meshlens: it never matches",
        "'request.auth.claims[iss]' is not a key meshlens evaluates (known: request.headers[NAME], source.ip, "
        "remote.ip, source.principal, source.namespace, source.serviceAccount, destination.port): it never matches"]


@pytest.mark.parametrize("text, message", [
    (PA + "  mtls: {mode: STRICTER}\n", "spec.mtls.mode (line 5): must be one of UNSET, DISABLE, PERMISSIVE, STRICT"),
    (PA + "  portLevelMtls: {'8080': {mode: DISABLE}}\n", "spec.portLevelMtls (line 5): needs a selector"),
    (PA + "  selector: {matchLabels: {app: a}}\n  portLevelMtls: {http: {mode: DISABLE}}\n",
     "spec.portLevelMtls.http (line 6): keys are port numbers"),
    (AP + "  action: PERMIT\n", "spec.action (line 5): must be one of ALLOW, DENY, AUDIT, CUSTOM"),
    (AP + "  action: CUSTOM\n", "spec.action (line 5): CUSTOM needs a provider"),
    (AP + "  rules:\n    - to: [{operation: {verbs: [GET]}}]\n", "spec.rules[0].to[0].operation.verbs (line 6): unknown"),
    (AP + "  rules:\n    - when: [{key: source.ip}]\n", "spec.rules[0].when[0] (line 6): needs a key, and values"),
    (RL + "  tokenBucket: {maxTokens: 10}\n", "spec.tokenBucket (line 5): needs maxTokens and fillInterval"),
    (RL + "  tokenBucket: {maxTokens: 0, fillInterval: 1s}\n", "spec.tokenBucket.maxTokens (line 5): must be 1 or more"),
    (RL + "  tokenBucket: {maxTokens: 5, fillInterval: soon}\n", "spec.tokenBucket.fillInterval (line 5): 'soon' is not"),
    (RL + "  bucket: {}\n", "spec.bucket (line 5): unknown field"),
])
def test_a_security_or_rate_limit_document_istio_or_envoy_would_refuse_is_refused_by_field_and_line(text, message):
    with pytest.raises(ResourceError) as e:
        parse_documents(text, "f.yaml")
    assert str(e.value).startswith("f.yaml document 1: " + message), str(e.value)

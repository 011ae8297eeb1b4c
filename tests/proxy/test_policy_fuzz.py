"""Whatever the control plane accepts, a sidecar can apply: hypothesis writes VirtualServices and
DestinationRules, and each one meshlens.policy accepts is read into policies and routes any request."""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.mesh import parse
from meshlens.policy.resources import ResourceError, read_document
from meshlens.proxy.policies import Policies
from meshlens.proxy.router import Router
from tests.proxy.test_routing import head

MESH = parse({"services": {"web": {}, "pay": {"instances": [
    {"address": "10.0.0.1:80", "labels": {"version": "v1"}}, {"address": "10.0.0.2:80", "labels": {"version": "v2"}}]}}})
text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
string_match = st.one_of(st.fixed_dictionaries({"exact": text}), st.fixed_dictionaries({"prefix": text}),
                         st.fixed_dictionaries({"regex": st.sampled_from(["/v[0-9]+/.*", ".*", "a|b", "(", "[a-"])}))
match = st.fixed_dictionaries({}, optional={
    "uri": string_match, "method": string_match, "authority": string_match, "port": st.integers(0, 70000),
    "headers": st.dictionaries(st.sampled_from(["x-user-type", "X-Debug", "cookie"]), st.one_of(st.just({}), string_match),
                               max_size=2),
    "queryParams": st.dictionaries(st.sampled_from(["mode", "v"]), string_match, max_size=2),
    "ignoreUriCase": st.booleans()})
destination = st.fixed_dictionaries({"host": st.sampled_from(["pay", "pay.default.svc.cluster.local", "other"])},
                                    optional={"subset": st.sampled_from(["v1", "v2"])})
duration = st.sampled_from(["1s", "250ms", "1m30s", "0s", "5", "-1s"])
percentage = st.fixed_dictionaries({"value": st.one_of(st.integers(-5, 105), st.floats(0, 100))})
rule = st.fixed_dictionaries({"route": st.lists(st.fixed_dictionaries({"destination": destination},
                                                                       optional={"weight": st.integers(0, 100)}),
                                                min_size=1, max_size=3)}, optional={
    "match": st.lists(match, max_size=3), "timeout": duration,
    "retries": st.fixed_dictionaries({}, optional={"attempts": st.integers(0, 5), "perTryTimeout": duration,
                                                   "retryOn": st.sampled_from(["5xx", "gateway-error,reset", "503",
                                                                               "bogus", "connect-failure,409"])}),
    "fault": st.fixed_dictionaries({}, optional={
        "delay": st.fixed_dictionaries({"fixedDelay": duration}, optional={"percentage": percentage}),
        "abort": st.fixed_dictionaries({"httpStatus": st.integers(100, 600)}, optional={"percentage": percentage})}),
    "mirror": destination, "mirrorPercentage": percentage})
pool = st.fixed_dictionaries({}, optional={
    "tcp": st.fixed_dictionaries({}, optional={"maxConnections": st.integers(0, 5), "connectTimeout": duration}),
    "http": st.fixed_dictionaries({}, optional={"http1MaxPendingRequests": st.integers(0, 5),
                                               "maxRequestsPerConnection": st.integers(0, 3),
                                               "maxRetries": st.integers(0, 3)})})
outlier = st.fixed_dictionaries({}, optional={
    "consecutive5xxErrors": st.integers(0, 5), "consecutiveGatewayErrors": st.integers(0, 5),
    "interval": duration, "baseEjectionTime": duration, "maxEjectionPercent": st.integers(0, 120),
    "minHealthPercent": st.integers(0, 100)})
HEADS = [b"GET / HTTP/1.1\r\nHost: pay\r\n\r\n", b"POST /v2/x?mode=fast HTTP/1.1\r\nHost: pay:8080\r\n"
         b"X-User-Type: beta-tester\r\nx-debug: 1\r\nContent-Length: 0\r\n\r\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=st.lists(rule, min_size=1, max_size=3), pool=pool, outlier=outlier,
       mode=st.sampled_from(["dry-run", "enforce"]))
def test_what_the_control_plane_accepts_the_sidecar_applies_and_routes_with(rules, pool, outlier, mode) -> None:
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "pay"},
          "spec": {"hosts": ["pay"], "http": rules}}
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "pay"},
          "spec": {"host": "pay", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                              {"name": "v2", "labels": {"version": "v2"}}],
                   "trafficPolicy": {"connectionPool": pool, "outlierDetection": outlier}}}
    docs = []
    for doc in (vs, dr):
        try:
            read_document(doc, "fuzz")
        except ResourceError:
            continue  # refused with its message: the control plane would not have stored it
        docs.append(doc)
    policies = Policies.build(MESH, "web", {"pay": mode}, docs, random.Random(0).random)
    router = Router(MESH, MESH.service("web"), rng=random.Random(0))
    router.set_policies(policies)
    for raw in HEADS:
        h = head(raw)
        route = router.outbound(h.authority.encode(), b"", None, h)
        assert route is not None

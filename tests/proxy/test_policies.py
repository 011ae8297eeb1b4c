"""Policies end to end: a real control plane, a real sidecar following it, real instances that fail on demand,
a real collector recording every call. The issue's example does what its author meant in enforce and says
what it would do in dry-run; then the same faulty upstreams, first in dry-run, then in enforce: what dry-run
says it would do (eject, time out, refuse overflow, retry, inject faults, rate-limit) is what enforce does."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.control.test_control_cli import cli
from tests.meshlens.policy.test_resources import EXAMPLE
from tests.proxy.conftest import free_port
from tests.proxy.policy_app import Instance
from tests.proxy.processes import ProxyProcess, recorded_calls
from tests.waiting import wait_until

COLUMNS = ("dst_service", "dst_subset", "path", "status", "mode", "action", "attempt", "response_flags", "error")


def request(port: int, host: str, path: str = "/", headers: dict[str, str] | None = None,
            timeout: float = 60, body: bytes | None = None) -> tuple[int, str, dict[str, str]]:
    """GET, or POST `body`; an error status is answered like any other."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 method="POST" if body is not None else "GET", headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def config(proxy: ProxyProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['admin']}/config", timeout=30) as resp:
        return json.loads(resp.read())


def stats(proxy: ProxyProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['admin']}/stats", timeout=30) as resp:
        return json.loads(resp.read())


def mode_doc(service: str, mode: str) -> str:
    return f"apiVersion: meshlens.io/v1alpha1\nkind: Mode\nmetadata:\n  name: {service}\nspec:\n  mode: {mode}\n"


def apply(control: ControlProcess, tmp_path: Path, *docs: str, flags: tuple[str, ...] = ()) -> int:
    """Apply the documents as one change (with the CLI's `flags`); the store's revision after it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / f"apply-{time.monotonic_ns()}.yaml"
    f.write_text("\n---\n".join(d.strip() for d in docs) + "\n")
    out = cli(control, "apply", "-f", str(f), "--reason", "test", *flags)
    assert out.returncode == 0, out.stderr
    return int(json.loads(cli(control, "status", "-o", "json").stdout)["revision"])


def follow(proxy: ProxyProcess, revision: int) -> dict:
    """Wait until the sidecar applied `revision` or a later one: on etcd, writes that are not changes (where a
    collector's shipping stands) move the revision too, and the snapshot's version with it."""
    return wait_until(lambda: (c := config(proxy))["control"]["state"] == "ACK"
                      and int(c["control"]["version"] or 0) >= revision and c, f"the sidecar on revision {revision}")


def instances(*items: Instance) -> list[dict]:
    return [{"address": f"127.0.0.1:{i.port}", "labels": {"version": i.name}} for i in items]


def calls(collector: CollectorProcess, proxy: ProxyProcess, n: int, where: str = "1") -> list[dict]:
    """The client-side rows of this sidecar, once `n` arrived, in the order the requests were made."""
    me = config(proxy)["observer_id"]
    rows = recorded_calls(collector.query_url, f"observer = 'client' AND observer_id = '{me}' AND {where}", n,
                          columns=COLUMNS)
    assert len(rows) >= n, rows
    return rows


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    col = CollectorProcess(tmp_path_factory.mktemp("collector")).start()
    yield col
    col.stop()


@pytest.fixture
def control(tmp_path: Path):
    with ControlProcess(tmp_path / "control") as c:
        yield c


def sidecar(tmp_path: Path, control: ControlProcess, collector: CollectorProcess, name: str = "web",
            *args: str) -> ProxyProcess:
    return ProxyProcess(tmp_path / f"{name}-{time.monotonic_ns()}", None, name, "--collector",
                        f"{collector.base}/v1/calls", *args, control=control.url).start()


# -- the example ------------------------------------------------------------------------------------


@pytest.fixture
def payment():
    v1, v2 = Instance("v1").start(), Instance("v2").start()
    yield v1, v2
    v1.stop()
    v2.stop()


def example_mesh(v1: Instance, v2: Instance) -> str:
    return json.dumps({"services": {"web": {}, "payment-service": {"instances": instances(v1, v2)}}})


def test_the_example_enforced_routes_beta_testers_to_v2_splits_the_rest_90_10_and_caps_requests_per_connection(
        tmp_path, control, collector, payment):
    v1, v2 = payment
    revision = apply(control, tmp_path, example_mesh(v1, v2), EXAMPLE, mode_doc("payment-service", "enforce"))
    with sidecar(tmp_path, control, collector) as proxy:
        cfg = follow(proxy, revision)
        assert cfg["destinations"]["payment-service"]["mode"] == "enforce"
        assert cfg["destinations"]["payment-service"]["virtual_service"] == "production/payment-service"
        beta = [request(proxy.outbound, "payment-service", "/pay", {"x-user-type": "beta-tester"})[:2]
                for _ in range(30)]
        assert beta == [(200, "v2")] * 30
        n = 400
        client = http.client.HTTPConnection("127.0.0.1", proxy.outbound, timeout=60)  # one kept-alive connection
        rest = Counter()
        for _ in range(n):
            client.request("GET", "/pay", headers={"Host": "payment-service"})
            resp = client.getresponse()
            rest[resp.read().decode()] += 1
        client.close()
        # v2's share is 10 %: 40 of 400, sd 6; five standard deviations either way
        assert set(rest) <= {"v1", "v2"} and 10 <= rest["v2"] <= 70, rest
        # maxRequestsPerConnection: 2 -- every upstream connection carried at most two requests, and some two
        carried = list(v1.per_connection.values()) + list(v2.per_connection.values())
        assert max(carried) == 2 and sum(carried) == 30 + n, Counter(carried)
        rows = calls(collector, proxy, 30 + n)
        assert {r["mode"] for r in rows} == {"enforce"}
        routed = Counter((r["dst_subset"], r["action"]) for r in rows)
        assert routed == {("v2", "routed:v2"): 30 + rest["v2"], ("v1", "routed:v1"): rest["v1"]}, routed


def test_the_example_in_dry_run_leaves_traffic_alone_and_says_where_it_would_have_gone(
        tmp_path, control, collector, payment):
    v1, v2 = payment
    revision = apply(control, tmp_path, example_mesh(v1, v2), EXAMPLE, mode_doc("payment-service", "dry-run"))
    with sidecar(tmp_path, control, collector) as proxy:
        follow(proxy, revision)
        beta = Counter(request(proxy.outbound, "payment-service", "/pay", {"x-user-type": "beta-tester"})[1]
                       for _ in range(20))
        assert beta == {"v1": 10, "v2": 10}  # round robin, as in observe: the route changes nothing
        rows = calls(collector, proxy, 20)
        assert {(r["mode"], r["action"]) for r in rows} == {("dry-run", "would_route:v2")}


# -- dry-run and enforce agree, on the same faulty upstreams ---------------------------------------------------

POLICIES = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment}
spec:
  host: payment-service
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ledger}
spec:
  host: ledger
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slow}
spec:
  hosts: [slow]
  http:
  - timeout: 300ms
    route: [{destination: {host: slow}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: retrying}
spec:
  hosts: [retrying]
  http:
  - retries: {attempts: 2, retryOn: 5xx}
    route: [{destination: {host: retrying}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: faulty}
spec:
  hosts: [faulty]
  http:
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: faulty}}]
  - fault: {delay: {fixedDelay: 50ms, percentage: {value: 100}}}
    route: [{destination: {host: faulty}}]
---
apiVersion: meshlens.io/v1alpha1
kind: LocalRateLimit
metadata: {name: web}
spec:
  service: web
  tokenBucket: {maxTokens: 2, tokensPerFill: 1, fillInterval: 1h}
"""
SERVICES = ("payment-service", "ledger", "slow", "retrying", "flaky", "faulty", "web")


def phase(tmp_path: Path, control: ControlProcess, collector: CollectorProcess, mode: str) -> dict:
    """The same upstreams and the same traffic in `mode`: what the client saw and what the record says."""
    good, bad = Instance("good").start(), Instance("bad", 503).start()
    ledger, slow, web = Instance("ledger").start(), Instance("slow").start(), Instance("web").start()
    retry_bad, retry_good = Instance("bad", 503).start(), Instance("good").start()
    flaky_good, faulty = Instance("good").start(), Instance("faulty").start()
    apps = [good, bad, ledger, slow, web, retry_bad, retry_good, flaky_good, faulty]
    try:
        dead = free_port()  # nothing listens: connect failure
        mesh = {"services": {
            "web": {"instances": [f"127.0.0.1:{web.port}"]}, "client": {},
            "payment-service": {"instances": instances(good, bad)},
            "ledger": {"instances": instances(ledger)}, "slow": {"instances": instances(slow)},
            "retrying": {"instances": instances(retry_bad, retry_good)},
            "flaky": {"instances": [f"127.0.0.1:{dead}", f"127.0.0.1:{flaky_good.port}"]},
            "faulty": {"instances": instances(faulty)}}}
        revision = apply(control, tmp_path, json.dumps(mesh), POLICIES, *(mode_doc(s, mode) for s in SERVICES))
        seen: dict = {}
        with sidecar(tmp_path, control, collector, "client") as proxy, \
                sidecar(tmp_path, control, collector, "web", "--app-port", str(web.port)) as server:
            follow(proxy, revision)
            follow(server, revision)
            out = proxy.outbound
            # outlier detection: round robin over good and bad; bad's third 503 ejects it
            seen["payment"] = [request(out, "payment-service")[1] for _ in range(10)]
            # the pool: one request sent, one pending, two more refused
            answers: list[int] = []
            threads = [threading.Thread(target=lambda: answers.append(request(out, "ledger", "/hold")[0]))
                       for _ in range(4)]
            for t in threads:
                t.start()
            if mode == "enforce":
                wait_until(lambda: answers.count(503) == 2 and ledger.held() == 1, "two refused, one sent")
            else:
                wait_until(lambda: ledger.held() == 4, "all four sent")
            ledger.release()
            for t in threads:
                t.join(60)
            seen["ledger"] = sorted(answers)
            # the route's timeout: held past 300 ms
            held: list = []
            t = threading.Thread(target=lambda: held.append(request(out, "slow", "/hold")[0]))
            t.start()
            wait_until(lambda: slow.held() == 1, "the slow request held")
            if mode == "enforce":
                wait_until(lambda: held, "the timeout's answer")
            else:
                time.sleep(0.5)  # at least this long: past the 300 ms timeout, whatever the machine's speed
            slow.release()
            t.join(60)
            seen["slow"] = held
            seen["retrying"] = request(out, "retrying")[:2]
            seen["flaky"] = request(out, "flaky")[:2]
            seen["abort"] = request(out, "faulty", "/abort")[0]
            seen["delay"] = request(out, "faulty", "/delay")[0]
            # inbound: web's own sidecar rate-limits its callers to two requests
            limited = [request(server.inbound, "web") for _ in range(3)]
            seen["limited"] = [s for s, _, _ in limited]
            seen["ratelimit_headers"] = {k.lower(): v for k, v in limited[2][2].items() if k.lower().startswith("x-ratelimit")}
            rows = calls(collector, proxy, 19)
            seen["rows"] = rows
            me = config(server)["observer_id"]
            seen["inbound"] = recorded_calls(collector.query_url, f"observer = 'server' AND observer_id = '{me}'", 3,
                                             columns=COLUMNS)
        return seen
    finally:
        for a in apps:
            a.stop()


def actions(rows: list[dict], service: str) -> list[str]:
    return [r["action"] for r in rows if r["dst_service"] == service]


def test_what_dry_run_says_it_would_do_is_what_enforce_does(tmp_path, control, collector):
    observed = phase(tmp_path / "observe", control, collector, "observe")
    dry = phase(tmp_path / "dry", control, collector, "dry-run")
    enforced = phase(tmp_path / "enforce", control, collector, "enforce")
    dry_rows, rows = dry["rows"], enforced["rows"]
    assert {r["mode"] for r in dry_rows} == {"dry-run"} and {r["mode"] for r in rows} == {"enforce"}
    # observe: no policy evaluated, nothing recorded of them; dry-run: the traffic exactly as in observe
    assert {(r["mode"], r["action"]) for r in observed["rows"] + observed["inbound"]} == {("observe", "")}
    assert {k: v for k, v in observed.items() if k not in ("rows", "inbound", "ratelimit_headers")} == \
        {k: v for k, v in dry.items() if k not in ("rows", "inbound", "ratelimit_headers")}

    # outlier detection: the 6th request (bad's third 503) ejects bad, in both; enforced, bad gets no more
    assert [i for i, a in enumerate(actions(dry_rows, "payment-service")) if a] == [5]
    assert actions(dry_rows, "payment-service")[5] == "would_eject"
    assert actions(rows, "payment-service")[5] == "ejected"
    assert dry["payment"] == ["good", "bad"] * 5
    assert enforced["payment"] == ["good", "bad"] * 3 + ["good"] * 4

    # the pool: two of four beyond maxConnections 1 + http1MaxPendingRequests 1
    assert dry["ledger"] == [200] * 4 and enforced["ledger"] == [200, 200, 503, 503]
    assert actions(dry_rows, "ledger").count("would_reject_overflow") == 2
    assert actions(rows, "ledger").count("overflow") == 2
    assert {r["response_flags"] for r in rows if r["action"] == "overflow"} == {"UO"}

    # the route's timeout
    assert dry["slow"] == [200] and enforced["slow"] == [504]
    assert actions(dry_rows, "slow") == ["would_timeout"] and actions(rows, "slow") == ["timed_out"]

    # retries on 5xx: enforced, the retry reaches the good instance
    assert dry["retrying"] == (503, "bad") and enforced["retrying"] == (200, "good")
    assert actions(dry_rows, "retrying") == ["would_retry"]
    [retried] = [r for r in rows if r["dst_service"] == "retrying"]
    assert (retried["action"], retried["attempt"], retried["status"]) == ("retried", 1, 200)

    # Istio's default policy: a connect failure is retried (on another host)
    assert dry["flaky"][0] == 503 and enforced["flaky"] == (200, "good")
    assert actions(dry_rows, "flaky") == ["would_retry"] and actions(rows, "flaky") == ["retried"]

    # faults
    assert (dry["abort"], dry["delay"]) == (200, 200) and (enforced["abort"], enforced["delay"]) == (418, 200)
    assert actions(dry_rows, "faulty") == ["would_fault", "would_fault"]
    assert actions(rows, "faulty") == ["fault_injected", "fault_injected"]
    assert [r["response_flags"] for r in rows if r["dst_service"] == "faulty"] == ["FI", "DI"]
    assert [r["response_flags"] for r in dry_rows if r["dst_service"] == "faulty"] == ["", ""]

    # the inbound rate limit: the third request finds the bucket empty
    assert dry["limited"] == [200, 200, 200] and enforced["limited"] == [200, 200, 429]
    assert [r["action"] for r in dry["inbound"]] == ["", "", "would_rate_limit"]
    assert [r["action"] for r in enforced["inbound"]] == ["", "", "rate_limited"]
    assert enforced["ratelimit_headers"] == {"x-ratelimit-limit": "2", "x-ratelimit-remaining": "0",
                                             "x-ratelimit-reset": enforced["ratelimit_headers"]["x-ratelimit-reset"]}


# -- modes switched at run time; the control plane away ----------------------------------------------------------

ABORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service}
spec:
  hosts: [payment-service]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: payment-service}}]
"""


def mode_set(control: ControlProcess, service: str, mode: str) -> int:
    out = cli(control, "mode", "set", service, mode, "--reason", f"try {mode}")
    assert out.returncode == 0, out.stderr
    return int(json.loads(cli(control, "status", "-o", "json").stdout)["revision"])


def test_modes_switch_on_a_running_sidecar_and_it_keeps_enforcing_with_the_control_plane_gone(
        tmp_path, collector, payment):
    v1, v2 = payment
    control = ControlProcess(tmp_path / "control").start()
    try:
        follow_at = apply(control, tmp_path, example_mesh(v1, v2), ABORT)
        proxy = sidecar(tmp_path, control, collector)
        with proxy:
            follow(proxy, follow_at)
            assert request(proxy.outbound, "payment-service")[0] == 200  # observe: the fault is not even evaluated
            follow(proxy, mode_set(control, "payment-service", "dry-run"))
            assert request(proxy.outbound, "payment-service")[0] == 200
            follow(proxy, mode_set(control, "payment-service", "enforce"))
            assert request(proxy.outbound, "payment-service")[:2] == (418, "fault filter abort\n")
            rows = calls(collector, proxy, 3)
            assert [(r["mode"], r["action"]) for r in rows] == [
                ("observe", ""), ("dry-run", "would_fault"), ("enforce", "fault_injected")]
            history = cli(control, "history", "payment-service").stdout
            assert "try dry-run" in history and "try enforce" in history
            port = control.port
            assert control.stop() == 0
            control.kill()
            assert request(proxy.outbound, "payment-service")[0] == 418  # still enforcing what it has
        # restarted while the control plane is away: its last snapshot, enforced
        with ProxyProcess(proxy.workdir, None, "web", "--no-record", control=f"http://127.0.0.1:{port}").start() as again:
            assert config(again)["control"]["state"] == "cached"
            assert config(again)["destinations"]["payment-service"]["mode"] == "enforce"
            assert request(again.outbound, "payment-service")[0] == 418
    finally:
        control.stop()
        control.kill()


MIRROR = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service}
spec:
  hosts: [payment-service]
  http:
  - route: [{destination: {host: payment-service}}]
    mirror: {host: shadow}
"""


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_mirroring_sends_a_copy_with_a_shadow_host_and_forgets_it(tmp_path, control, collector, mode):
    main, shadow = Instance("main").start(), Instance("shadow", 500).start()
    try:
        mesh = {"services": {"web": {}, "payment-service": {"instances": instances(main)},
                             "shadow": {"instances": instances(shadow)}}}
        revision = apply(control, tmp_path, json.dumps(mesh), MIRROR, mode_doc("payment-service", mode))
        with sidecar(tmp_path, control, collector) as proxy:
            follow(proxy, revision)
            assert request(proxy.outbound, "payment-service", "/orders", body=b"order-1")[:2] == (200, "main")
            # the shadow's 500 is never seen
            [row] = calls(collector, proxy, 1)
            if mode == "enforce":
                wait_until(lambda: shadow.arrived["/orders"] == 1, "the copy at the shadow")
                assert shadow.hosts == ["payment-service-shadow"] and shadow.bodies == [b"order-1"]
                assert row["action"] == "mirrored"
            else:
                assert row["action"] == "would_mirror" and shadow.arrived["/orders"] == 0
    finally:
        main.stop()
        shadow.stop()


AUTHZ = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads-only, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin*]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-pay, namespace: default}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {paths: [/pay]}}]
"""


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_authorization_policies_deny_in_enforce_and_say_would_deny_in_dry_run(tmp_path, control, collector, mode):
    web = Instance("web").start()
    try:
        mesh = {"services": {"web": {"instances": [f"127.0.0.1:{web.port}"]}}}
        revision = apply(control, tmp_path, json.dumps(mesh), AUTHZ, mode_doc("web", mode))
        with sidecar(tmp_path, control, collector, "web", "--app-port", str(web.port)) as server:
            follow(server, revision)
            port = server.inbound
            got = [request(port, "web", "/pay")[:2], request(port, "web", "/admin/users")[:2],
                   request(port, "web", "/pay", body=b"{}")[:2]]
            me = config(server)["observer_id"]
            rows = recorded_calls(collector.query_url, f"observer = 'server' AND observer_id = '{me}'", 3,
                                  columns=COLUMNS + ("method",))
            actions = {(r["method"], r["path"]): r["action"] for r in rows}
            if mode == "enforce":
                assert got == [(200, "web"), (403, "RBAC: access denied\n"), (403, "RBAC: access denied\n")]
                assert actions == {("GET", "/pay"): "audited", ("GET", "/admin/users"): "denied",
                                   ("POST", "/pay"): "audited,denied"}
                assert {r["response_flags"] for r in rows if r["status"] == 403} == {"RBAC"}
                assert web.arrived["/admin/users"] == 0 and web.arrived["/pay"] == 1
            else:
                assert got == [(200, "web")] * 3
                assert actions == {("GET", "/pay"): "audited", ("GET", "/admin/users"): "would_deny",
                                   ("POST", "/pay"): "audited,would_deny"}
    finally:
        web.stop()

"""Policies per HTTP/2 stream, end to end: a control plane, a sidecar following it, a grpcio server that fails on
demand, a collector. Retries on UNAVAILABLE (Istio's default retryOn), a route timeout answered as gRPC's
DEADLINE_EXCEEDED, outlier detection counting grpc-status; dry-run says what enforce does."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest

from meshlens.proxy.mirror import shadow_fields
from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.grpc_peers import METHODS, SERVICE, grpc_server
from tests.proxy.conftest import free_port
from tests.proxy.processes import LoopThread, ProxyProcess, recorded_calls
from tests.proxy.test_policies import apply, config, follow, mode_doc, stats
from tests.waiting import PATIENCE_S, wait_until

COLUMNS = ("path", "status", "grpc_status", "attempt", "action", "error", "response_flags", "dst_port")


class Flaky:
    """Every other call fails UNAVAILABLE before any message (trailers-only: what a retry may act on)."""

    def __init__(self) -> None:
        self.calls = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            n = next(self.calls)
        if n % 2 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok"


def _down(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.UNAVAILABLE, "this instance is broken")


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    with CollectorProcess(tmp_path_factory.mktemp("h2-policies") / "collector") as c:
        yield c


@pytest.fixture
def control(tmp_path):
    with ControlProcess(tmp_path / "control") as c:
        yield c


def grpc_mesh(*ports: int) -> str:
    return json.dumps({"services": {"web": {}, "backend": {
        "protocol": "grpc", "instances": [{"address": f"127.0.0.1:{p}", "labels": {"version": f"v{i}"}}
                                          for i, p in enumerate(ports)]}}})


def calls_of(collector: CollectorProcess, proxy: ProxyProcess, n: int) -> list[dict]:
    me = config(proxy)["observer_id"]
    return recorded_calls(collector.query_url, f"observer = 'client' AND observer_id = '{me}'", n, columns=COLUMNS)


def call(port: int, method: str, n: int, timeout: float = PATIENCE_S) -> list[str]:
    """`n` calls on one channel, one after another: the status name each ended with."""
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "backend")]) as ch:
        stub = ch.unary_unary(f"/{SERVICE}/{method}")
        for _ in range(n):
            try:
                stub(b"x", timeout=timeout)
                out.append("OK")
            except grpc.RpcError as e:
                out.append(e.code().name)
    return out


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_unavailable_is_retried_in_enforce_and_would_be_in_dry_run(tmp_path, control, collector, mode) -> None:
    with grpc_server({**METHODS, "Flaky": grpc.unary_unary_rpc_method_handler(Flaky())}) as port:
        revision = apply(control, tmp_path, grpc_mesh(port), mode_doc("backend", mode))
        with ProxyProcess(tmp_path / "web", None, "web", "--collector", f"{collector.base}/v1/calls",
                          control=control.url).start() as proxy:
            follow(proxy, revision)
            seen = call(proxy.outbound, "Flaky", 10)
            rows = calls_of(collector, proxy, 10)
    if mode == "enforce":  # each failure retried once, on Istio's default policy (retryOn has unavailable)
        assert seen == ["OK"] * 10
        assert [(r["grpc_status"], r["attempt"], r["action"]) for r in rows] == [(0, 1, "retried")] * 10
    else:
        assert seen == ["UNAVAILABLE", "OK"] * 5
        assert [(r["grpc_status"], r["action"]) for r in rows] == [(14, "would_retry"), (0, "")] * 5


def test_a_route_timeout_answers_deadline_exceeded_and_outliers_count_grpc_status(tmp_path, control, collector):
    timeout_rule = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: [backend]
  http:
    - match: [{uri: {exact: /demo.Greeter/Slow}}]
      timeout: 0.3s
      route: [{destination: {host: backend}}]
    - route: [{destination: {host: backend}}]
      retries: {attempts: 0}
"""
    outliers = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
"""
    with grpc_server() as good, grpc_server({**METHODS, "Hello": grpc.unary_unary_rpc_method_handler(_down)}) as bad:
        revision = apply(control, tmp_path, grpc_mesh(good, bad), timeout_rule, outliers,
                         mode_doc("backend", "enforce"))
        with ProxyProcess(tmp_path / "web", None, "web", "--collector", f"{collector.base}/v1/calls",
                          control=control.url).start() as proxy:
            follow(proxy, revision)
            slow = call(proxy.outbound, "Slow", 1)
            hello = call(proxy.outbound, "Hello", 20)
            rows = calls_of(collector, proxy, 21)
    assert slow == ["DEADLINE_EXCEEDED"]
    assert (rows[0]["grpc_status"], rows[0]["error"], rows[0]["response_flags"]) == (4, "timeout", "UT")
    # round robin: the broken instance fails every other call until its third UNAVAILABLE ejects it
    failed = [r for r in rows[1:] if r["grpc_status"] == 14]
    assert hello.count("UNAVAILABLE") == len(failed) == 3, hello
    assert failed[-1]["action"] == "ejected" and {r["dst_port"] for r in failed} == {bad}
    last = max(i for i, s in enumerate(hello) if s != "OK")
    assert last <= 6 and hello[last + 1:] == ["OK"] * (19 - last)  # ejected: the rest go to the good one


def test_grpc_between_meshed_sidecars_goes_over_mtls_with_each_sides_identity(tmp_path, collector) -> None:
    from tests.proxy.test_mtls import API, WEB, with_identity
    from tests.proxy.test_policies import stats

    with grpc_server() as app, ControlProcess(tmp_path / "control") as control:
        inbound = free_port()
        revision = apply(control, tmp_path, json.dumps({"services": {"web": {}, "api": {"instances": [
            {"address": f"127.0.0.1:{inbound}", "labels": {"security.istio.io/tlsMode": "istio"}}]}}}))
        record = ("--collector", f"{collector.base}/v1/calls")
        with ProxyProcess(tmp_path / "api", None, "api", *record, "--app-port", str(app), "--inbound-port",
                          str(inbound), control=control.url).start() as api, \
                ProxyProcess(tmp_path / "web", None, "web", *record, control=control.url).start() as web:
            for p in (api, web):
                follow(p, revision)
                with_identity(p)
            with grpc.insecure_channel(f"127.0.0.1:{web.outbound}", options=[("grpc.default_authority", "api")]) as ch:
                stub = ch.unary_unary(f"/{SERVICE}/Hello")
                assert [stub(b"%d" % i, timeout=PATIENCE_S) for i in range(3)] == [b"hi 0", b"hi 1", b"hi 2"]
            me = {p: config(p)["observer_id"] for p in (web, api)}
            cols = ("protocol", "grpc_status", "tls", "peer_identity")
            client = recorded_calls(collector.query_url, f"observer_id = '{me[web]}'", 3, columns=cols)
            server = recorded_calls(collector.query_url, f"observer_id = '{me[api]}'", 3, columns=cols)
            assert [tuple(r.values()) for r in client] == [("grpc", 0, True, API)] * 3
            assert [tuple(r.values()) for r in server] == [("grpc", 0, True, WEB)] * 3
            assert stats(web)["upstream_cx_mtls"] == 1 and stats(web)["upstream_cx_http2_total"] == 1
            assert stats(api)["downstream_cx_mtls"] == 1 and stats(api)["downstream_cx_http2_total"] == 1


class _Refusing(asyncio.Protocol):
    """An HTTP/2 server (h2, in the test's loop) that refuses every other stream with REFUSED_STREAM and answers
    the rest 200 `ok`: what a server at its stream limit, or going away, does."""

    def __init__(self, counter: itertools.count) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.counter = counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.t.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                if next(self.counter) % 2 == 0:
                    self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                else:
                    self.h2.send_headers(ev.stream_id, [(b":status", b"200"), (b"content-length", b"2")])
                    self.h2.send_data(ev.stream_id, b"ok", end_stream=True)
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.t.write(self.h2.data_to_send())


@pytest.mark.parametrize("mode", ["dry-run", "enforce"])
def test_a_refused_stream_is_retried_in_enforce_and_would_be_in_dry_run(tmp_path, control, collector, mode) -> None:
    import http.client

    loop = LoopThread()
    server = loop.run(loop.loop.create_server(lambda: _Refusing(itertools.count()), "127.0.0.1", 0))
    try:
        port = server.sockets[0].getsockname()[1]
        revision = apply(control, tmp_path, grpc_mesh(port), mode_doc("backend", mode))
        with ProxyProcess(tmp_path / "web", None, "web", "--collector", f"{collector.base}/v1/calls",
                          control=control.url).start() as proxy:
            follow(proxy, revision)
            client = http.client.HTTPConnection("127.0.0.1", proxy.outbound, timeout=PATIENCE_S)
            seen = []
            for _ in range(6):  # HTTP/1.1 in, HTTP/2 out (backend is declared grpc)
                client.request("GET", "/x", headers={"Host": "backend"})
                resp = client.getresponse()
                seen.append((resp.status, resp.read()))
            client.close()
            rows = calls_of(collector, proxy, 6)
    finally:
        server.close()
        loop.stop()
    if mode == "enforce":  # Istio's default retryOn has refused-stream
        assert seen == [(200, b"ok")] * 6
        assert [(r["attempt"], r["action"], r["error"]) for r in rows] == [(1, "retried", "")] * 6, rows
    else:
        assert [s for s, _ in seen] == [503, 200] * 3
        assert [(r["error"], r["action"]) for r in rows] == [("refused_stream", "would_retry"), ("", "")] * 3


MIRRORS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: [backend]
  http:
  - match: [{uri: {exact: /demo.Greeter/Echo}}]
    route: [{destination: {host: backend}}]
    mirror: {host: plain}
  - route: [{destination: {host: backend}}]
    mirror: {host: shadow}
"""


def test_a_mirrored_copy_goes_in_the_protocol_its_service_speaks(tmp_path, control, collector) -> None:
    """gRPC to a shadow declared grpc goes as HTTP/2, from an HTTP/2 client or an HTTP/1.1 one (its chunked body
    unframed); to a shadow declared http as HTTP/1.1, its body sized; each with the shadow's authority."""
    import http.client

    from tests.proxy.policy_app import Instance
    from tests.proxy.test_h2 import grpc_message

    copies: list[tuple[bytes, dict]] = []

    def shadow_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        copies.append((request, dict(context.invocation_metadata())))
        return b"the shadow's answer, never seen"

    plain = Instance("plain").start()
    try:
        with grpc_server() as main, grpc_server({"Hello": grpc.unary_unary_rpc_method_handler(shadow_hello)}) as sh:
            mesh = json.dumps({"services": {
                "web": {}, "backend": {"protocol": "grpc", "instances": [f"127.0.0.1:{main}"]},
                "shadow": {"protocol": "grpc", "instances": [f"127.0.0.1:{sh}"]},
                "plain": {"protocol": "http", "instances": [f"127.0.0.1:{plain.port}"]}}})
            revision = apply(control, tmp_path, mesh, MIRRORS, mode_doc("backend", "enforce"))
            with ProxyProcess(tmp_path / "web", None, "web", "--collector", f"{collector.base}/v1/calls",
                              control=control.url).start() as proxy:
                follow(proxy, revision)
                with grpc.insecure_channel(f"127.0.0.1:{proxy.outbound}",
                                           options=[("grpc.default_authority", "backend")]) as ch:
                    assert ch.unary_unary(f"/{SERVICE}/Hello")(b"over h2", timeout=PATIENCE_S) == b"hi over h2"
                    echoed = list(ch.unary_stream(f"/{SERVICE}/Echo")(b"to plain", timeout=PATIENCE_S))
                    assert echoed == [b"to plain"] * 2
                conn = http.client.HTTPConnection("127.0.0.1", proxy.outbound, timeout=PATIENCE_S)
                conn.request("POST", f"/{SERVICE}/Hello", body=iter([grpc_message(b"over http/1.1")]),
                             headers={"Host": "backend", "content-type": "application/grpc", "te": "trailers"},
                             encode_chunked=True)
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read() == grpc_message(b"hi over http/1.1")
                conn.close()
                wait_until(lambda: len(copies) == 2 and plain.arrived[f"/{SERVICE}/Echo"] == 1, "the copies")
                rows = calls_of(collector, proxy, 3)
    finally:
        plain.stop()
    assert sorted(payload for payload, _ in copies) == [b"over h2", b"over http/1.1"]
    assert all(meta.get("traceparent") for _, meta in copies)
    assert (plain.hosts, plain.bodies) == (["backend-shadow"], [grpc_message(b"to plain")])
    assert [r["action"] for r in rows] == ["mirrored"] * 3
    assert shadow_fields([(b":authority", b"backend:8080"), (b"x", b"backend")]) == [
        (b":authority", b"backend-shadow:8080"), (b"x", b"backend")]


class _GoingAway(asyncio.Protocol):
    """An HTTP/2 server whose first connection, once two streams are open on it, says GOAWAY after the first and
    answers only that one, then closes; later connections answer every stream. Each answer names its
    connection."""

    def __init__(self, connections: itertools.count) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.n = next(connections)
        self.open: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.t.write(self.h2.data_to_send())

    def _answer(self, stream_id: int) -> None:
        body = b"connection %d" % self.n
        self.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(body))])
        self.h2.send_data(stream_id, body, end_stream=True)

    def data_received(self, data: bytes) -> None:
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                if self.n:
                    self._answer(ev.stream_id)
                    continue
                self.open.append(ev.stream_id)
                if len(self.open) == 2:  # the second: processed is the first only (RFC 9113 6.8)
                    first = self.open[0]
                    away = hyperframe.frame.GoAwayFrame(0)
                    away.last_stream_id = first
                    self.t.write(self.h2.data_to_send() + away.serialize())  # beside h2, which would close
                    self._answer(first)
                    self.t.write(self.h2.data_to_send())
                    self.t.close()
                    return
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.t.write(self.h2.data_to_send())


NO_RETRIES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend}
spec:
  hosts: [backend]
  http:
  - route: [{destination: {host: backend}}]
    retries: {attempts: 0}
"""


def test_a_stream_an_upstream_goaway_left_unprocessed_goes_again_on_a_new_connection(tmp_path, control, collector):
    """Not a retry of the policy's (it allows none): RFC 9113 8.7 says such a stream is safe to send again."""
    import http.client

    loop = LoopThread()
    server = loop.run(loop.loop.create_server(lambda: _GoingAway(connections), "127.0.0.1", 0))
    connections = itertools.count()
    try:
        port = server.sockets[0].getsockname()[1]
        revision = apply(control, tmp_path, grpc_mesh(port), NO_RETRIES, mode_doc("backend", "enforce"))
        with ProxyProcess(tmp_path / "web", None, "web", "--collector", f"{collector.base}/v1/calls",
                          control=control.url).start() as proxy:
            follow(proxy, revision)

            def get(path: str) -> tuple[int, bytes]:
                client = http.client.HTTPConnection("127.0.0.1", proxy.outbound, timeout=PATIENCE_S)
                client.request("GET", path, headers={"Host": "backend"})
                resp = client.getresponse()
                got = resp.status, resp.read()
                client.close()
                return got

            with futures.ThreadPoolExecutor(2) as pool:  # two streams at once on the first connection
                seen = sorted(pool.map(get, ["/a", "/b"]))
            rows = calls_of(collector, proxy, 2)
            assert stats(proxy)["upstream_cx_http2_total"] == 2
    finally:
        server.close()
        loop.stop()
    assert seen == [(200, b"connection 0"), (200, b"connection 1")]
    assert [(r["status"], r["error"]) for r in rows] == [(200, "")] * 2

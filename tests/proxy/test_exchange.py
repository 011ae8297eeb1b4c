"""One exchange as a transcript (mitmproxy's Playbook style): a fake client connection, fake
upstream connections, a fake pool and clock in; the bytes written each way and the record's
fields out. A test policy answers locally, retries on a second endpoint and times out, in
enforce and in dry-run, through the same policy chain the sidecar runs."""
from __future__ import annotations

from typing import Any

import pytest

from meshlens.protocols.http1 import RequestReader, ResponseReader
from meshlens.protocols.trace_context import parse_traceparent
from meshlens.proxy.chain import Chain, Decision, Kind
from meshlens.proxy.connect import UC, UF, UT, URX, LocalReply, failure
from meshlens.proxy.exchange import MAX_ATTEMPTS, MAX_REPLAY_BYTES, Exchange, State, plain_response
from meshlens.proxy.headers import request_head, response_head
from meshlens.proxy.router import Route

A = Route(("10.0.0.1", 8080), "orders", "v1")
B = Route(("10.0.0.2", 8080), "orders", "v2")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Timer:
    def __init__(self, clock: Clock, at: float, fn: Any) -> None:
        self.clock, self.at, self.fn, self.cancelled = clock, at, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000_000
        self.timers: list[Timer] = []

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)
        for timer in list(self.timers):
            if not timer.cancelled and timer.at <= self.t:
                self.timers.remove(timer)
                timer.fn()


class FakeUpstream:
    """An upstream connection: what the exchange sent it, and how it was let go."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.sent = b""
        self.exchange: Exchange | None = None
        self.ended = ""  # "", released, closed, aborted
        self.peer_identity = ""  # plaintext

    def attach(self, ex: Exchange) -> None:
        self.exchange = ex

    def send_request(self, ex: Exchange, body: Any) -> None:
        out = request_head(ex.head, ex.trace, ex.new_id, ex.env.peer_field)
        self.send(out + b"".join(body) if body else out)

    def send(self, data: bytes) -> None:
        self.sent += data

    def end_request(self) -> None:
        pass

    def close(self) -> None:
        self.ended = "closed"

    def abort(self) -> None:
        self.ended = "aborted"

    def answer(self, data: bytes) -> None:
        """The upstream's response bytes, through the codec as the Upstream shell feeds them."""
        assert self.exchange is not None
        ex = self.exchange

        class Shell:
            def on_response(self, head: Any) -> None:
                ex.response_head(head)

            def on_response_body(self, body: bytes) -> None:
                ex.response_body(body)

            def on_response_end(self, head: Any, n: int) -> None:
                ex.response_end(head, n)

        reader = ResponseReader(Shell())
        reader.expect(ex.method)
        reader.feed(data)


class Pool:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[FakeUpstream]] = {}
        self.released: list[FakeUpstream] = []

    def take(self, addr: tuple[str, int]) -> FakeUpstream | None:
        idle = self.idle.get(addr)
        return idle.pop() if idle else None

    def release(self, up: FakeUpstream) -> None:
        up.ended = "released"
        self.released.append(up)


class Destination:
    """A destination's policies, as proxy/policies.py builds them: here only the chain."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.mode = "enforce"


class Env:
    def __init__(self, chain: Chain | None = None, timeout: float | None = None, routes: tuple[Route, ...] = (B,)) -> None:
        self.clock = Clock()
        self.chain = chain
        self.pool = Pool()
        self.peer_field = b"x-meshlens-peer: web\r\n"
        self.upstream_timeout = timeout
        self.dials: list[tuple[tuple[str, int], Exchange]] = []
        self.routes = list(routes)

    def now_ns(self) -> int:
        return self.clock.t

    def wall_ns(self) -> int:
        return 1_700_000_000_000_000_000 + self.clock.t

    def call_later(self, delay: float, fn: Any) -> Timer:
        timer = Timer(self.clock, self.clock.t + int(delay * 1e9), fn)
        self.clock.timers.append(timer)
        return timer

    def dial(self, addr: tuple[str, int], ex: Exchange) -> None:
        self.dials.append((addr, ex))

    def rebalance(self, route: Route, tried: tuple[Any, ...] = ()) -> Route | LocalReply:
        if not self.routes:
            return LocalReply(503, "no healthy upstream", "no_healthy_upstream", "UH")
        return self.routed(self.routes.pop(0))

    def routed(self, route: Route) -> Route:
        """The route as the router gives it when its destination has policies: carrying them."""
        if self.chain is None:
            return route
        return Route(route.addr, route.dst_service, route.dst_subset, route.src_service, route.endpoint,
                     Destination(self.chain))

    def cluster(self, service: str) -> None:
        return None

    def connect(self, i: int = -1) -> FakeUpstream:
        """The dial `i` succeeds."""
        addr, ex = self.dials[i]
        up = FakeUpstream(addr)
        ex.connected(up)
        return up


class Conn:
    """The client's connection: what was written to it, and when the exchange said it was done."""

    def __init__(self) -> None:
        self.out = b""
        self.done: list[Exchange] = []
        self.aborted = False
        self.closing = False
        self.paused: set[str] = set()

    def write(self, data: bytes) -> None:
        self.out += data

    def write_head(self, head: Any, close: bool) -> None:
        self.out += response_head(head, close)

    def write_local(self, reply: LocalReply, close: bool) -> bytes:
        out = plain_response(reply.status, reply.text, close, reply.headers)
        self.out += out
        return out

    def exchange_done(self, ex: Exchange) -> None:
        self.done.append(ex)

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self, reason: str) -> None:
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        self.paused.discard(reason)


class SamplePolicy:
    """Denies /deny, retries 503s, and (in its on_error) retries a connect failure once."""

    name = "test"

    def __init__(self, mode: str = "enforce") -> None:
        self.mode = mode

    def on_request(self, ex: Exchange) -> Decision | None:
        if ex.path == "/deny":
            return Decision(Kind.REPLY, "denied", LocalReply(403, "RBAC: access denied", "denied", "RBAC"))
        return None

    def on_response(self, ex: Exchange, head: Any) -> Decision | None:
        return Decision(Kind.RETRY, "retried") if head.status == 503 else None

    def on_error(self, ex: Exchange, reply: LocalReply) -> Decision | None:
        return Decision(Kind.RETRY, "retried") if reply.flags == UF and ex.attempt < 2 else None


def begin(env: Env, raw: bytes, route: Route | LocalReply = A) -> tuple[Exchange, Conn]:
    """A request through the codec, as the Downstream shell feeds it, then started."""
    conn = Conn()
    made: list[Exchange] = []

    class Shell:
        def on_request(self, head: Any) -> None:
            made.append(Exchange(conn, env, head))

        def on_request_body(self, data: bytes) -> None:
            made[-1].request_body(data)

        def on_request_end(self, head: Any, n: int) -> None:
            made[-1].request_end(n)

    RequestReader(Shell()).feed(raw)
    (ex,) = made
    ex.start(env.routed(route) if isinstance(route, Route) else route)
    return ex, conn


GET = b"GET /orders/7?x=1 HTTP/1.1\r\nHost: orders\r\ntraceparent: 00-" + TRACE.encode() + b"-00f067aa0ba902b7-01\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"


def test_observe_forwards_the_head_spliced_and_the_response_as_it_came() -> None:
    env = Env()
    ex, conn = begin(env, GET)
    assert ex.state is State.CONNECTING and [d[0] for d in env.dials] == [A.addr]
    up = env.connect()
    head, _, _ = up.sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /orders/7?x=1 HTTP/1.1" and lines[-1] == b"Host: orders"
    sent_trace = parse_traceparent(lines[1].split(b": ", 1)[1])
    assert sent_trace is not None and sent_trace[0] == TRACE and sent_trace[1] == ex.trace.span_id
    assert ex.trace.parent_span_id == "00f067aa0ba902b7"  # the incoming span is the parent
    assert lines[2] == b"x-request-id: " + ex.request_id and lines[3] == b"x-meshlens-peer: web"
    up.answer(OK)
    assert conn.out == OK and conn.done == [ex] and up.ended == "released"
    assert (ex.state, ex.status, ex.response_bytes, ex.attempt, ex.actions, ex.flags) == (State.DONE, 200, 2, 1, (), "")


def test_a_pooled_connection_is_used_before_dialing() -> None:
    env = Env()
    pooled = FakeUpstream(A.addr)
    env.pool.idle[A.addr] = [pooled]
    ex, conn = begin(env, GET)
    assert env.dials == [] and pooled.exchange is ex and ex.state is State.SENT


def test_a_body_that_arrives_while_connecting_is_sent_after_the_head() -> None:
    env = Env()
    ex, conn = begin(env, b"POST /pay HTTP/1.1\r\nHost: pay\r\nContent-Length: 5\r\n\r\nhello")
    up = env.connect()
    assert up.sent.endswith(b"\r\n\r\nhello") and ex.request_done and ex.request_bytes == 5


def test_enforced_local_reply_never_reaches_the_upstream() -> None:
    env = Env(Chain([SamplePolicy("enforce")]))
    ex, conn = begin(env, b"GET /deny HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert env.dials == [] and conn.out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"RBAC: access denied" in conn.out
    assert (ex.status, ex.error, ex.flags, ex.actions) == (403, "denied", "RBAC", ("denied",))


def test_dry_run_says_what_it_would_have_done_and_changes_nothing() -> None:
    env = Env(Chain([SamplePolicy("dry-run")]))
    ex, conn = begin(env, b"GET /deny HTTP/1.1\r\nHost: orders\r\n\r\n")
    up = env.connect()
    up.answer(UNAVAILABLE)
    assert conn.out == UNAVAILABLE and len(env.dials) == 1
    assert (ex.status, ex.attempt, ex.actions) == (503, 1, ("would_deny", "would_retry"))


def test_enforced_retry_goes_to_a_second_endpoint_with_the_body_replayed() -> None:
    env = Env(Chain([SamplePolicy("enforce")]))
    ex, conn = begin(env, b"PUT /cart HTTP/1.1\r\nHost: orders\r\nContent-Length: 3\r\n\r\nabc")
    first = env.connect()
    first.answer(UNAVAILABLE)
    assert first.ended == "aborted" and conn.out == b""  # the 503 never reaches the client
    assert [d[0] for d in env.dials] == [A.addr, B.addr] and ex.route == B
    second = env.connect()
    assert second.sent.endswith(b"\r\n\r\nabc") and second.sent.split(b"\r\n")[0] == b"PUT /cart HTTP/1.1"
    second.answer(OK)
    assert conn.out == OK and (ex.status, ex.attempt, ex.actions) == (200, 2, ("retried",))


def test_a_request_larger_than_the_replay_buffer_is_never_retried() -> None:
    env = Env(Chain([SamplePolicy("enforce")]))
    body = b"x" * (MAX_REPLAY_BYTES + 1)
    ex, conn = begin(env, b"POST /big HTTP/1.1\r\nHost: orders\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    up = env.connect()
    up.answer(UNAVAILABLE)
    assert conn.out == UNAVAILABLE and len(env.dials) == 1 and ex.replay is None
    assert (ex.status, ex.attempt, ex.flags) == (503, 1, "")


def test_retries_stop_at_max_attempts_with_urx() -> None:
    env = Env(Chain([SamplePolicy("enforce")]), routes=(B,) * MAX_ATTEMPTS)
    ex, conn = begin(env, GET)
    for _ in range(MAX_ATTEMPTS):
        env.connect().answer(UNAVAILABLE)
    assert conn.out == UNAVAILABLE and (ex.attempt, ex.flags) == (MAX_ATTEMPTS, URX)


def test_the_upstream_timeout_answers_504_ut_and_cuts_the_upstream() -> None:
    env = Env(timeout=2.0)
    ex, conn = begin(env, GET)
    up = env.connect()
    env.clock.advance(1.9)
    assert conn.out == b""
    env.clock.advance(0.2)
    assert conn.out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n") and up.ended == "aborted"
    assert (ex.status, ex.error, ex.flags) == (504, "timeout", UT)


def test_no_timeout_by_default_as_in_istio() -> None:
    env = Env()
    begin(env, GET)
    env.connect()
    assert env.clock.timers == []


def test_a_timeout_mid_response_cuts_the_client_connection() -> None:
    env = Env(timeout=1.0)
    ex, conn = begin(env, GET)
    up = env.connect()
    up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    env.clock.advance(1.5)
    assert conn.aborted and (ex.status, ex.flags, ex.state) == (200, UT, State.DONE)


def test_a_connect_failure_is_503_uf_and_a_policy_may_retry_it() -> None:
    env = Env()
    ex, conn = begin(env, GET)
    env.dials[0][1].connect_failed(failure(ConnectionRefusedError()))
    assert conn.out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and (ex.error, ex.flags) == ("refused", UF)

    env = Env(Chain([SamplePolicy("enforce")]))
    ex, conn = begin(env, GET)
    env.dials[0][1].connect_failed(failure(ConnectionRefusedError()))
    env.connect().answer(OK)
    assert conn.out == OK and (ex.attempt, ex.actions, ex.route) == (2, ("retried",), B)


def test_a_pooled_connection_lost_before_answering_is_retried_once_on_a_fresh_one() -> None:
    env = Env()
    pooled = FakeUpstream(A.addr)
    env.pool.idle[A.addr] = [pooled]
    ex, conn = begin(env, GET)
    ex.upstream_lost()  # the upstream had closed the idle connection as we wrote to it
    assert [d[0] for d in env.dials] == [A.addr] and ex.state is State.CONNECTING
    fresh = env.connect()
    assert fresh.sent == pooled.sent  # the same request again
    ex.upstream_lost()  # lost again: no second free retry
    assert conn.out.startswith(b"HTTP/1.1 503 ") and (ex.error, ex.flags, ex.attempt) == ("reset", UC, 2)


def test_a_fresh_connection_lost_is_not_retried() -> None:
    env = Env()
    ex, conn = begin(env, GET)
    env.connect()
    ex.upstream_lost()
    assert len(env.dials) == 1 and conn.out.startswith(b"HTTP/1.1 503 ") and ex.flags == UC


def test_a_response_cut_mid_body_aborts_the_client() -> None:
    env = Env()
    ex, conn = begin(env, GET)
    up = env.connect()
    up.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    ex.upstream_lost()
    assert conn.aborted and conn.out.endswith(b"01234") and (ex.error, ex.flags) == ("reset", UC)


def test_a_router_reply_is_written_without_an_attempt() -> None:
    env = Env()
    ex, conn = begin(env, GET, LocalReply(508, "loop", "loop"))
    assert conn.out.startswith(b"HTTP/1.1 508 Loop Detected\r\n") and b"connection: close" in conn.out
    assert env.dials == [] and ex.close_after and ex.attempt == 0


def test_interim_responses_reach_http_1_1_clients_only() -> None:
    closing = OK.replace(b"OK\r\n", b"OK\r\nconnection: close\r\n")  # a 1.0 client without keep-alive
    for version, expected in ((b"1.1", b"HTTP/1.1 100 Continue\r\n\r\n" + OK), (b"1.0", closing)):
        env = Env()
        ex, conn = begin(env, b"POST /u HTTP/" + version + b"\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        env.connect().answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        assert conn.out == expected


@pytest.mark.parametrize(("response", "client_close", "expect_close"), [
    (OK, False, False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False, False),  # upstream's, not the client's
    (OK, True, True),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True, True),
])
def test_the_client_hears_connection_close_exactly_when_its_connection_ends(
        response: bytes, client_close: bool, expect_close: bool) -> None:
    env = Env()
    ex, conn = begin(env, GET.replace(b"Host: orders\r\n", b"Host: orders\r\nConnection: close\r\n") if client_close else GET)
    env.connect().answer(response)
    head = conn.out.split(b"\r\n\r\n")[0].lower()
    assert (b"connection: close" in head) is expect_close and head.count(b"connection:") <= 1
    assert conn.out.endswith(b"\r\n\r\nok")


def test_a_per_try_timeout_fails_the_attempt_which_the_chain_may_retry_elsewhere() -> None:
    class RetryTimeouts:
        name, mode = "retry", "enforce"

        def on_error(self, ex: Exchange, reply: LocalReply) -> Decision | None:
            return Decision(Kind.RETRY, "retried") if reply.flags == UT and ex.attempt < 2 else None

    env = Env(Chain([RetryTimeouts()]))
    ex, conn = begin(env, b"GET /slow HTTP/1.1\r\nHost: orders\r\n\r\n")
    ex.per_try = 0.5
    first = env.connect()
    first.exchange = ex
    env.clock.advance(0.4)
    assert ex.state is State.SENT and not ex.actions
    env.clock.advance(0.2)  # past 0.5 s: the attempt fails, the chain retries on B
    assert first.ended == "aborted" and ex.actions == ("timed_out", "retried") and ex.route == B
    second = env.connect()
    second.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert conn.out.startswith(b"HTTP/1.1 200 OK") and ex.attempt == 2

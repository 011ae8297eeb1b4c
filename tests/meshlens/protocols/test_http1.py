"""RequestReader / ResponseReader transcripts: bytes in, the consumer's callbacks out.

The proxy drives the readers directly (heads, body bytes as framed, ends); the tap
through Http1Tracker (test_http1_tracker.py). Both see the same heads: the drift the
two used to have (absolute-form authority, traceparent versions) is pinned here.
"""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import (
    MAX_CHUNK_LINE,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    Phase,
    RequestReader,
    ResponseReader,
)
from meshlens.protocols.http1_tracker import Http1Tracker
from meshlens.protocols.trace_context import parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


class Log:
    """A consumer that writes down every callback."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.heads: list[Any] = []

    def on_request(self, head: Any) -> None:
        self.heads.append(head)
        self.log.append(("request", head.method, head.target, head.raw))

    def on_request_body(self, data: bytes) -> None:
        self.log.append(("request_body", bytes(data)))

    def on_request_end(self, head: Any, body_bytes: int) -> None:
        self.log.append(("request_end", body_bytes))

    def on_response(self, head: Any) -> None:
        self.heads.append(head)
        self.log.append(("response", head.status, head.interim, head.raw))

    def on_response_body(self, data: bytes) -> None:
        self.log.append(("response_body", bytes(data)))

    def on_response_end(self, head: Any, body_bytes: int) -> None:
        self.log.append(("response_end", body_bytes))

    def on_tunnel(self, data: bytes) -> None:
        self.log.append(("tunnel", bytes(data)))


def merged(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Adjacent body pieces joined: how bytes are cut must not matter."""
    out: list[tuple[Any, ...]] = []
    for entry in log:
        if out and entry[0].endswith("_body") and out[-1][0] == entry[0]:
            out[-1] = (entry[0], out[-1][1] + entry[1])
        else:
            out.append(entry)
    return out


def test_pipelined_requests_give_each_head_exactly_and_body_bytes_as_framed() -> None:
    c = Log()
    r = RequestReader(c)
    first = b"GET /a?x=1 HTTP/1.1\r\nHost: svc\r\n\r\n"
    second = b"POST /b HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n"
    third = b"PUT /c HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\n"
    r.feed(first + second + body + third + b"dataGET")
    assert merged(c.log) == [
        ("request", "GET", b"/a?x=1", first), ("request_end", 0),
        ("request", "POST", b"/b", second), ("request_body", body), ("request_end", 3),
        ("request", "PUT", b"/c", third), ("request_body", b"data"), ("request_end", 4),
    ]
    assert r.phase is Phase.HEAD and bytes(r.held) == b"GET"
    a, b, _ = c.heads
    assert (a.path, a.authority, a.keep_alive, b.chunked, b.content_length) == ("/a", "svc", True, True, -1)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 150), max_size=8))
def test_the_same_callbacks_whatever_the_cut(cuts: list[int]) -> None:
    data = (b"POST /u HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            b"GET /v HTTP/1.1\r\nHost: s\r\n\r\nPOST /w HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz")
    whole, pieces = Log(), Log()
    RequestReader(whole).feed(data)
    reader = RequestReader(pieces)
    bounds = sorted({0, len(data), *(c % len(data) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        reader.feed(data[a:b])
    assert merged(pieces.log) == merged(whole.log)


def test_absolute_form_authority_ends_at_the_query_as_rfc_3986_says() -> None:
    c = Log()
    RequestReader(c).feed(b"GET http://h:1?x=1 HTTP/1.1\r\n\r\nGET http://inv:8080/items?id=7 HTTP/1.1\r\n\r\n")
    assert [(h.authority, h.path) for h in c.heads] == [("h:1", "/"), ("inv:8080", "/items")]
    t = Http1Tracker()  # the tap reads the same heads
    t.feed_request(b"GET http://h:1?x=1 HTTP/1.1\r\n\r\n", 1)
    (ex,) = t.feed_response(b"HTTP/1.1 204 No Content\r\n\r\n", 2)
    assert (ex.authority, ex.path) == ("h:1", "/")


def test_host_wins_over_the_target_and_connect_names_its_authority() -> None:
    c = Log()
    RequestReader(c).feed(b"GET http://a:1/p HTTP/1.1\r\nHost: b:2\r\n\r\nCONNECT db:5432 HTTP/1.1\r\n\r\n")
    assert [(h.authority, h.path, h.upgrade) for h in c.heads] == [("b:2", "/p", False), ("db:5432", "", True)]


def test_fields_read_in_any_spelling_and_hop_by_hop_noticed() -> None:
    c = Log()
    RequestReader(c, extra=frozenset({b"x-meshlens-peer"})).feed(
        b"GET / HTTP/1.1\r\nHOST: h\r\nTRACEPARENT: 00-" + TRACE.encode() + b"-" + SPAN.encode() + b"-01\r\n"
        b"X-Request-Id: r1\r\nx-MeshLens-Peer: web\r\nConnection: keep-alive\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-secret\r\nx-secret: 1\r\n\r\n")
    a, b = c.heads
    assert (a.authority, a.request_id, a.extra, a.hop_by_hop, a.keep_alive) == ("h", b"r1", {b"x-meshlens-peer": b"web"}, False, True)
    assert parse_traceparent(a.traceparent) == (TRACE, SPAN, "01")
    assert (b.hop_by_hop, b.keep_alive, b.connection) == (True, False, b"close, x-secret")


def test_after_connection_close_nothing_more_is_read() -> None:
    c = Log()
    r = RequestReader(c)
    r.feed(b"GET /bye HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n")
    assert [h.path for h in c.heads] == ["/bye"] and r.phase is Phase.CLOSED and r.skipped_bytes == 25


def test_http_1_0_keeps_alive_only_when_asked() -> None:
    c = Log()
    RequestReader(c).feed(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    assert [(h.version, h.keep_alive) for h in c.heads] == [("1.0", True), ("1.0", False)]


def test_responses_are_framed_by_their_requests() -> None:
    c = Log()
    r = ResponseReader(c)
    for method in ("HEAD", "GET", "GET", "GET"):
        r.expect(method)
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"  # HEAD: no body whatever the length says
           b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 204 No Content\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert [(e[0], e[1]) for e in merged(c.log)] == [
        ("response", 200), ("response_end", 0), ("response", 100), ("response", 204), ("response_end", 0),
        ("response", 200), ("response_body", b"2\r\nok\r\n0\r\n\r\n"), ("response_end", 2),
        ("response", 200), ("response_body", b"hi"), ("response_end", 2)]
    assert [h.method for h in c.heads] == ["HEAD", "", "GET", "GET", "GET"] and r.phase is Phase.IDLE


def test_a_response_without_length_ends_at_close() -> None:
    c = Log()
    r = ResponseReader(c)
    r.expect("GET")
    r.feed(b"HTTP/1.0 200 OK\r\n\r\nstreamed")
    r.feed(b" until close")
    assert r.feed_eof() is False
    assert merged(c.log)[1:] == [("response_body", b"streamed until close"), ("response_end", 20)]
    assert c.heads[0].keep_alive is False


def test_eof_inside_a_framed_body_is_a_cut_message() -> None:
    r = ResponseReader(Log())
    r.expect("GET")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123")
    assert r.feed_eof() is True and r.body_bytes == 4


def test_101_and_connect_2xx_hand_what_follows_to_the_tunnel() -> None:
    c = Log()
    req = RequestReader(c)
    req.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
    assert req.phase is Phase.UPGRADE_WAIT and c.heads[0].upgrade
    resp = ResponseReader(c)
    resp.expect("GET")
    resp.feed(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi")
    assert c.log[-1] == ("tunnel", b"\x81\x02hi") and c.heads[-1].upgraded
    assert req.upgrade_answered(True) == b"early" and req.phase is Phase.TUNNEL

    c = Log()
    resp = ResponseReader(c)
    resp.expect("CONNECT")
    resp.feed(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01")
    assert c.log[-1] == ("tunnel", b"\x16\x03\x01") and resp.phase is Phase.TUNNEL


def test_a_refused_upgrade_parses_the_held_bytes_as_requests() -> None:
    c = Log()
    req = RequestReader(c)
    req.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
    assert [h.path for h in c.heads] == ["/ws"]
    assert req.upgrade_answered(False) == b""
    assert [h.path for h in c.heads] == ["/ws", "/next"]


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"x-pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n", 431, "MAX_HEADER_BYTES"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1)) + b"\r\n", 431, "MAX_HEADER_COUNT"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "malformed"),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "malformed"),
    (b"GET /\x00 HTTP/1.1\r\n\r\n", 400, "malformed"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * MAX_CHUNK_LINE, 400, "MAX_CHUNK_LINE"),
])
def test_bad_requests_raise_the_status_to_answer_and_resynchronise(data: bytes, status: int, words: str) -> None:
    r = RequestReader(Log())
    with pytest.raises(PeerError) as info:
        r.feed(data)
    assert info.value.status == status and words in str(info.value)
    assert r.phase is Phase.RESYNC
    r.feed(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")  # the tap carries on at the next request line
    assert r.phase is Phase.IDLE


def test_a_head_never_ended_is_refused_at_the_limit_not_after() -> None:
    r = RequestReader(Log())
    r.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(PeerError) as info:
        for _ in range(MAX_HEADER_BYTES // 64 + 2):
            r.feed(b"x-a: " + b"b" * 57 + b"\r\n")
    assert info.value.status == 431 and len(r.held) == 0


def test_bad_responses_are_502() -> None:
    r = ResponseReader(Log())
    r.expect("GET")
    with pytest.raises(PeerError) as info:
        r.feed(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert info.value.status == 502


@pytest.mark.parametrize(("value", "expected"), [
    (f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN, "01")),
    (f"01-{TRACE}-{SPAN}-01", (TRACE, SPAN, "01")),  # a later version: the fields 00 defines, continued
    (f"cc-{TRACE}-{SPAN}-00-what-the-future-adds", (TRACE, SPAN, "00")),
    (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 is exactly 55 characters
    (f"cc-{TRACE}-{SPAN}-01x", None),  # a later version still needs '-' after the flags
    (f"ff-{TRACE}-{SPAN}-01", None),
    (f"00-{'0' * 32}-{SPAN}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{SPAN}-01", None),
    ("garbage", None),
    (None, None),
])
def test_one_traceparent_parser_for_the_proxy_and_the_tap(value: str | None, expected: tuple[str, str, str] | None) -> None:
    assert parse_traceparent(value) == expected
    if value is not None:
        assert parse_traceparent(value.encode()) == expected


def test_the_http2_preface_is_not_an_http1_request() -> None:
    r = RequestReader(Log())
    with pytest.raises(PeerError) as info:
        r.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert info.value.status == 400 and "HTTP/2" in str(info.value)

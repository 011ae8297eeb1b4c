"""Http1Tracker transcripts: bytes of each direction in (with times), events and Exchange records out."""
from __future__ import annotations

from typing import Any

import pytest

from meshlens.protocols.errors import LocalError, PeerError
from meshlens.protocols.exchange import Event, Exchange, TunnelClosed, TunnelOpened
from meshlens.protocols.http1 import MAX_HEADER_BYTES, Phase
from meshlens.protocols.http1_tracker import Http1Tracker, State


def play(tracker: Http1Tracker, *steps: tuple[Any, ...]) -> list[Event]:
    """Steps: ("req"|"resp", bytes, t), ("req_eof"|"resp_eof", t), ("gap", direction, nbytes, t)."""
    events: list[Event] = []
    for step in steps:
        kind = step[0]
        if kind == "req":
            events += tracker.feed_request(step[1], step[2])
        elif kind == "resp":
            events += tracker.feed_response(step[1], step[2])
        elif kind == "req_eof":
            events += tracker.feed_request_eof(step[1])
        elif kind == "resp_eof":
            events += tracker.feed_response_eof(step[1])
        elif kind == "gap":
            events += tracker.gap(step[1], step[2], step[3])
        else:
            raise AssertionError(kind)
    return events


def exchanges(events: list[Event]) -> list[Exchange]:
    return [e for e in events if isinstance(e, Exchange)]


def get(path: str, host: str = "svc", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def ok(body: bytes = b"", status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_three_pipelined_requests_in_one_packet() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/a?page=2", extra="traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n")
         + b"POST /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nx-request-id: r-2\r\n\r\nhello"
         + get("/c"), 100),
        ("resp", ok(b"one") + ok(b"two!", "201 Created"), 200),
        ("resp", ok(b"", "404 Not Found"), 300),
    )
    assert exchanges(events) == [
        Exchange(100, "GET", "/a", "svc", "1.1", 200, 0, 3, 200, 200,
                 traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Exchange(100, "POST", "/b", "svc", "1.1", 201, 5, 4, 200, 200, x_request_id="r-2"),
        Exchange(100, "GET", "/c", "svc", "1.1", 404, 0, 0, 300, 300),
    ]
    assert t.pending == type(t.pending)() and t.request.phase is Phase.IDLE


def test_response_split_byte_by_byte() -> None:
    t = Http1Tracker()
    play(t, ("req", get("/slow"), 10))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n"
    events = play(t, *[("resp", raw[i:i + 1], 1000 + i) for i in range(len(raw))])
    assert exchanges(events) == [Exchange(10, "GET", "/slow", "svc", "1.1", 200, 0, 9, 1000, 1000 + len(raw) - 1)]
    assert exchanges(events)[0].duration_ns == 1000 + len(raw) - 1 - 10


def test_chunked_with_trailers_both_ways() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"PUT /blob HTTP/1.1\r\nHost: s3\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
                b"3\r\nabc\r\n", 1),
        ("req", b"a\r\n0123456789\r\n0\r\nx-checksum: 42\r\n\r\n", 2),
        ("resp", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nserver-timing: db;dur=3\r\n\r\n", 3),
    )
    assert exchanges(events) == [Exchange(1, "PUT", "/blob", "s3", "1.1", 200, 13, 2, 3, 3)]


def test_head_with_content_length_has_no_body_and_keep_alive_continues() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"HEAD /big HTTP/1.1\r\nHost: cdn\r\n\r\n", 1),
        ("resp", b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n", 2),
        ("req", get("/small", "cdn"), 3),
        ("resp", ok(b"hi"), 4),
    )
    assert exchanges(events) == [
        Exchange(1, "HEAD", "/big", "cdn", "1.1", 200, 0, 0, 2, 2),
        Exchange(3, "GET", "/small", "cdn", "1.1", 200, 0, 2, 4, 4),
    ]


def test_pipelined_head_after_get_in_one_packet() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/a") + b"HEAD /b HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/c"), 1),
        ("resp", ok(b"x" * 10) + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + ok(b"yz"), 2),
    )
    assert [(x.method, x.path, x.status, x.response_body_bytes) for x in exchanges(events)] == [
        ("GET", "/a", 200, 10), ("HEAD", "/b", 200, 0), ("GET", "/c", 200, 2)]


def test_304_and_204_have_no_body() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/etag", extra='If-None-Match: "v1"\r\n') + b"DELETE /x HTTP/1.1\r\nHost: svc\r\n\r\n", 1),
        ("resp", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n', 2),
    )
    assert [(x.method, x.status, x.response_body_bytes, x.incomplete) for x in exchanges(events)] == [
        ("GET", 304, 0, False), ("DELETE", 204, 0, False)]


def test_100_continue_then_final_response() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n", 1),
        ("resp", b"HTTP/1.1 100 Continue\r\n\r\n", 2),
        ("req", b"data", 3),
        ("resp", ok(b"stored", "201 Created"), 4),
    )
    assert exchanges(events) == [Exchange(1, "POST", "/upload", "api", "1.1", 201, 4, 6, 2, 4)]  # started at the 100


def test_101_upgrade_becomes_a_counted_tunnel() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x02hi", 1),
        ("resp", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x03hey", 2),
        ("req", b"GET / HTTP/1.1\r\n\r\n", 3),  # inside the tunnel: not parsed, counted
        ("resp_eof", 9),
    )
    assert exchanges(events) == [Exchange(1, "GET", "/chat", "ws", "1.1", 101, 0, 0, 2, 2, upgraded=True)]
    assert events[-2:] == [TunnelOpened(2), TunnelClosed(request_bytes=4 + 18, response_bytes=5, start_ns=2, end_ns=9)]
    assert t.state is State.CLOSED


def test_refused_upgrade_goes_on_as_http() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n" + get("/next", "a"), 1),
        ("resp", ok(b"no h2c") + ok(b"next"), 2),
    )
    assert [(x.path, x.status, x.upgraded) for x in exchanges(events)] == [("/h2c", 200, False), ("/next", 200, False)]
    assert t.state is State.HTTP and TunnelOpened(2) not in events


def test_connect_2xx_becomes_a_tunnel() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n", 1),
        ("resp", b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03", 2),
        ("req", b"\x16\x03\x01\x00\x05hello", 3),
    )
    assert exchanges(events) == [Exchange(1, "CONNECT", "", "db.internal:5432", "1.1", 200, 0, 0, 2, 2, upgraded=True)]
    assert (t.state, t.tunnel_request_bytes, t.tunnel_response_bytes) == (State.TUNNEL, 10, 3)


def test_http10_response_delimited_by_close() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"GET /legacy HTTP/1.0\r\n\r\n", 1),
        ("resp", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ", 2),
        ("resp", b"second", 3),
        ("resp_eof", 4),
    )
    assert exchanges(events) == [Exchange(1, "GET", "/legacy", "", "1.0", 200, 0, 12, 2, 4)]
    assert t.state is State.CLOSED


def test_connection_close_ends_the_exchanges() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/bye", extra="Connection: close\r\n") + get("/ignored"), 1),
        ("resp", ok(b"bye", extra="Connection: close\r\n"), 2),
        ("resp_eof", 3),
    )
    assert exchanges(events) == [Exchange(1, "GET", "/bye", "svc", "1.1", 200, 0, 3, 2, 2)]
    assert t.request.skipped_bytes >= len(get("/ignored"))  # llhttp does not say where the extra bytes began


def test_absolute_form_target_gives_the_authority() -> None:
    t = Http1Tracker()
    events = play(t, ("req", b"GET http://inventory:8080/items?id=7 HTTP/1.1\r\n\r\n", 1), ("resp", ok(), 2))
    assert (exchanges(events)[0].authority, exchanges(events)[0].path) == ("inventory:8080", "/items")


def test_oversized_request_headers_are_431() -> None:
    t = Http1Tracker()
    with pytest.raises(PeerError, match="MAX_HEADER_BYTES") as info:
        t.feed_request(get("/", extra=f"Cookie: {'c' * MAX_HEADER_BYTES}\r\n"), 1)
    assert info.value.status == 431


def test_oversized_headers_fed_in_small_pieces_are_431_with_bounded_memory() -> None:
    t = Http1Tracker()
    t.feed_request(b"GET / HTTP/1.1\r\nX-Big: ", 1)
    with pytest.raises(PeerError) as info:
        for _ in range(MAX_HEADER_BYTES // 1000 + 2):
            t.feed_request(b"v" * 1000, 2)
    assert info.value.status == 431 and t.request.phase is Phase.RESYNC and t.buffered == 0


def test_oversized_response_headers_are_502() -> None:
    t = Http1Tracker()
    t.feed_request(get("/"), 1)
    with pytest.raises(PeerError) as info:
        t.feed_response(ok(extra=f"Set-Cookie: {'c' * MAX_HEADER_BYTES}\r\n"), 2)
    assert info.value.status == 502
    assert exchanges(info.value.events) == [
        Exchange(1, "GET", "/", "svc", "1.1", 0, 0, 0, 2, 2, incomplete=True, error="protocol_error")]


@pytest.mark.parametrize("line", [b"GET / HTTX/1.1\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n", b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_malformed_request_is_400_and_the_tracker_resyncs(line: bytes) -> None:
    t = Http1Tracker()
    with pytest.raises(PeerError) as info:
        t.feed_request(line, 1)
    assert info.value.status == 400 and t.request.phase is Phase.RESYNC
    events = play(t, ("resp", ok(b"bad", "400 Bad Request"), 2), ("req", get("/after"), 3), ("resp", ok(b"!"), 4))
    assert [(x.path, x.status, x.incomplete, x.error) for x in exchanges(events)] == [
        ("", 400, True, "protocol_error"), ("/after", 200, False, "")]


def test_gap_in_a_response_body_marks_it_incomplete_and_resyncs() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/1") + get("/2"), 1),
        ("resp", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100, 2),
        ("gap", "response", 800, 3),  # lost: 800 body bytes
        ("resp", b"b" * 100 + ok(b"second"), 4),  # the tail of the first body, then the next response
    )
    assert exchanges(events) == [
        Exchange(1, "GET", "/1", "svc", "1.1", 200, 0, 900, 2, 3, incomplete=True, error="gap"),
        Exchange(1, "GET", "/2", "svc", "1.1", 200, 0, 6, 4, 4),
    ]
    assert t.response.skipped_bytes == 100


def test_gap_covering_a_whole_request_keeps_responses_paired() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", get("/1"), 1),
        ("gap", "request", 40, 2),  # GET /2 was lost
        ("req", get("/3"), 3),
        ("resp", ok(b"1") + ok(b"22") + ok(b"333"), 4),
    )
    assert [(x.path, x.response_body_bytes, x.incomplete) for x in exchanges(events)] == [
        ("/1", 1, False), ("", 2, True), ("/3", 3, False)]


def test_capture_started_mid_connection() -> None:
    t = Http1Tracker(midstream=True)
    events = play(
        t,
        ("req", b"ody of an earlier request\r\n" + get("/seen"), 1),
        ("resp", b"tail of an earlier response\r\n" + ok(b"ok"), 2),
    )
    assert [(x.path, x.status, x.incomplete) for x in exchanges(events)] == [("/seen", 200, False)]


def test_response_without_request_and_eof_with_pending_requests() -> None:
    t = Http1Tracker()
    events = play(t, ("resp", ok(b"?", "408 Request Timeout"), 1))
    assert exchanges(events) == [Exchange(0, "", "", "", "1.1", 408, 0, 1, 1, 1, incomplete=True, error="no_request")]
    events = play(t, ("req", get("/late"), 2), ("resp_eof", 3))
    assert exchanges(events) == [Exchange(2, "GET", "/late", "svc", "1.1", 0, 0, 0, 0, 3, incomplete=True, error="no_response")]


def test_truncated_response_at_eof_is_incomplete() -> None:
    t = Http1Tracker()
    events = play(t, ("req", get("/"), 1), ("resp", ok(b"0123456789")[:-4], 2), ("resp_eof", 3))
    assert exchanges(events) == [Exchange(1, "GET", "/", "svc", "1.1", 200, 0, 6, 2, 3, incomplete=True, error="truncated")]


def test_close_flushes_and_feeding_a_closed_tracker_is_our_bug() -> None:
    t = Http1Tracker()
    t.feed_request(get("/"), 1)
    assert "pending=1" in repr(t) and "state=HTTP" in repr(t)
    assert exchanges(t.close(5, "reset"))[0].error == "reset"
    with pytest.raises(LocalError, match="CLOSED"):
        t.feed_request(get("/"), 6)
    assert t.close(7) == []


def test_head_response_split_byte_by_byte_then_pipelined_get() -> None:
    t = Http1Tracker()
    play(t, ("req", b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n" + get("/g", "a"), 1))
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + ok(b"body")
    events = play(t, *[("resp", raw[i:i + 1], 10 + i) for i in range(len(raw))])
    head_end = raw.index(b"\r\n\r\n") + 3
    assert exchanges(events) == [
        Exchange(1, "HEAD", "/h", "a", "1.1", 200, 0, 0, 10, 10 + head_end),
        Exchange(1, "GET", "/g", "a", "1.1", 200, 0, 4, 10 + head_end + 1, 10 + len(raw) - 1),
    ]


def test_refused_connect_with_a_body_goes_on_as_http() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"CONNECT evil:25 HTTP/1.1\r\nHost: evil:25\r\n\r\n", 1),
        ("resp", ok(b"denied", "403 Forbidden"), 2),
        ("req", get("/ok"), 3),
        ("resp", ok(b"fine"), 4),
    )
    assert [(x.method, x.status, x.response_body_bytes, x.upgraded) for x in exchanges(events)] == [
        ("CONNECT", 403, 6, False), ("GET", 200, 4, False)]
    assert t.state is State.HTTP


def test_gap_inside_a_tunnel_is_counted() -> None:
    t = Http1Tracker()
    play(t, ("req", b"CONNECT a:1 HTTP/1.1\r\n\r\n", 1), ("resp", b"HTTP/1.1 200 OK\r\n\r\n", 2))
    events = play(t, ("gap", "response", 1000, 3), ("req", b"abc", 4), ("resp_eof", 5))
    assert events == [TunnelClosed(request_bytes=3, response_bytes=1000, start_ns=2, end_ns=5)]


def test_too_many_unanswered_requests_is_refused() -> None:
    from meshlens.protocols.http1 import MAX_PENDING_EXCHANGES

    t = Http1Tracker()
    t.feed_request(get("/") * MAX_PENDING_EXCHANGES, 1)
    with pytest.raises(PeerError, match="MAX_PENDING_EXCHANGES") as info:
        t.feed_request(get("/one-too-many"), 2)
    assert info.value.status == 429 and len(t.pending) == MAX_PENDING_EXCHANGES


def test_a_request_in_its_body_is_pending_and_shows_in_repr() -> None:
    t = Http1Tracker()
    assert t.feed_request(b"POST /v1/pay HTTP/1.1\r\nHost: pay\r\nContent-Length: 2\r\n\r\n", 7) == []
    assert [(x.method, x.path, x.authority, x.request_start_ns) for x in t.pending] == [("POST", "/v1/pay", "pay", 7)]
    assert "request=BODY" in repr(t)


def test_response_before_the_request_is_fully_sent() -> None:
    t = Http1Tracker()
    events = play(
        t,
        ("req", b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\n0123", 1),
        ("resp", ok(b"too big", "413 Content Too Large", "Connection: close\r\n"), 2),
        ("req", b"456789", 3),  # the client keeps sending: parsed, the emitted record does not change
    )
    assert exchanges(events) == [Exchange(1, "POST", "/upload", "api", "1.1", 413, 4, 7, 2, 2)]
    assert exchanges(events)[0].request_body_bytes == 4

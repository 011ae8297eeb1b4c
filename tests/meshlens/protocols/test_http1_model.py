"""Model-based: generated well-formed HTTP/1.1 conversations, cut anywhere, must give
exactly the exchanges the generator wrote down."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.protocols.exchange import Exchange
from meshlens.protocols.http1_tracker import Http1Tracker

BODY = st.binary(max_size=50)


def chunked(body: bytes, pieces: int, trailers: bool) -> bytes:
    step = max(1, len(body) // max(1, pieces))
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step]) for i in range(0, len(body), step))
    return out + b"0\r\n" + (b"x-checksum: 1\r\n" if trailers else b"") + b"\r\n"


@st.composite
def conversation(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[tuple[str, str, int, int, int]]]:
    """(request messages, response messages, expected (method, path, status, req body, resp body))."""
    requests, responses, expected = [], [], []
    for i in range(draw(st.integers(1, 6))):
        method = draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT"]))
        path = f"/r{i}"
        req_body = draw(BODY) if method in ("POST", "PUT") else b""
        head = f"{method} {path}?q={i} HTTP/1.1\r\nHost: svc\r\n".encode()
        expect = bool(req_body) and draw(st.booleans())
        if expect:
            head += b"Expect: 100-continue\r\n"
        if req_body and draw(st.booleans()):
            head += b"Transfer-Encoding: chunked\r\n\r\n" + chunked(req_body, draw(st.integers(1, 4)), draw(st.booleans()))
        else:
            head += b"Content-Length: %d\r\n\r\n" % len(req_body) + req_body
        requests.append(head)

        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
        resp_body = b"" if status in (204, 304) else draw(BODY)
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" if expect else (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" if draw(st.booleans()) else b"")
        resp = interim + f"HTTP/1.1 {status} X\r\n".encode()
        if status in (204, 304):
            resp += b"\r\n"
        elif draw(st.booleans()):
            resp += b"Transfer-Encoding: chunked\r\n\r\n"
            if method != "HEAD":
                resp += chunked(resp_body, draw(st.integers(1, 4)), draw(st.booleans()))
        else:
            resp += b"Content-Length: %d\r\n\r\n" % len(resp_body)
            if method != "HEAD":
                resp += resp_body
        responses.append(resp)
        expected.append((method, path, status, len(req_body), 0 if method == "HEAD" else len(resp_body)))
    return requests, responses, expected


def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


@settings(max_examples=300, deadline=None)
@given(conv=conversation(), pipelined=st.booleans(), data=st.data())
def test_generated_conversations_give_the_written_exchanges(conv, pipelined: bool, data: st.DataObject) -> None:
    requests, responses, expected = conv
    t = Http1Tracker()
    got: list[Exchange] = []
    clock = 0

    def feed(direction: str, message: bytes) -> None:
        nonlocal clock
        for piece in cut(data.draw, message):
            clock += 1
            events = t.feed_request(piece, clock) if direction == "req" else t.feed_response(piece, clock)
            got.extend(e for e in events if isinstance(e, Exchange))

    if pipelined:
        feed("req", b"".join(requests))
        feed("resp", b"".join(responses))
    else:
        for request, response in zip(requests, responses):
            feed("req", request)
            feed("resp", response)
    assert [(x.method, x.path, x.status, x.request_body_bytes, x.response_body_bytes) for x in got] == expected
    assert not any(x.incomplete for x in got) and not t.pending and t.buffered == 0
    assert all(x.request_start_ns <= x.response_start_ns <= x.response_end_ns for x in got)


@settings(max_examples=200, deadline=None)
@given(conv=conversation(), data=st.data())
def test_a_gap_inside_one_response_body_costs_only_that_exchange(conv, data: st.DataObject) -> None:
    requests, responses, expected = conv
    # a response whose body is plain Content-Length bytes (the tap's common case)
    candidates = [i for i, r in enumerate(responses)
                  if b"Content-Length" in r and expected[i][4] >= 2 and b"Transfer-Encoding" not in r]
    if not candidates:
        return
    k = data.draw(st.sampled_from(candidates))
    body_at = len(responses[k]) - expected[k][4]
    a = data.draw(st.integers(body_at + 1, len(responses[k]) - 1))
    b = data.draw(st.integers(a, len(responses[k]) - 1))
    t = Http1Tracker()
    t.feed_request(b"".join(requests), 1)
    events = t.feed_response(b"".join(responses[:k]) + responses[k][:a], 2)
    events += t.gap("response", b - a, 3)
    events += t.feed_response(responses[k][b:] + b"".join(responses[k + 1:]), 4)
    got = [e for e in events if isinstance(e, Exchange)]
    assert [(x.method, x.path, x.status) for x in got] == [e[:3] for e in expected]
    assert [x.incomplete for x in got] == [i == k for i in range(len(expected))]
    assert got[k].error == "gap" and got[k].response_body_bytes == a - body_at + (b - a)
    assert [(x.request_body_bytes, x.response_body_bytes) for i, x in enumerate(got) if i != k] == \
        [e[3:] for i, e in enumerate(expected) if i != k]

"""Hypothesis: arbitrary bytes, arbitrarily split, into every core. Only the cores' own
errors come out, and what they buffer stays under the named limits."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.protocols.errors import PeerError, ProtocolError
from meshlens.protocols.http1 import MAX_HEADER_BYTES, MAX_PENDING_EXCHANGES, RESYNC_WINDOW
from meshlens.protocols.http1_tracker import Http1Tracker, State
from meshlens.protocols.sniff import sniff
from meshlens.protocols.tls import MAX_HELLO_BYTES, MAX_RECORD_BYTES, HelloParser
from meshlens.protocols.tls import State as TlsState
from tests.meshlens.protocols.tls_builder import alpn_ext, client_hello, records, sni_ext

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that steer random bytes into the interesting corners of HTTP/1.
HTTP_PIECES = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"HEAD /h HTTP/1.1\r\n", b"CONNECT a:1 HTTP/1.1\r\n", b"POST /p HTTP/1.0\r\n",
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 101 S\r\n", b"HTTP/1.0 204 N\r\n",
    b"Host: x\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n",
    b"Connection: upgrade\r\n", b"Upgrade: websocket\r\n", b"Expect: 100-continue\r\n", b"\r\n",
    b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc", b"x-long: " + b"v" * 3000 + b"\r\n",
])
STREAM = st.lists(st.one_of(HTTP_PIECES, st.binary(max_size=40)), max_size=30).map(b"".join)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["req", "resp"]), STREAM),
        st.tuples(st.just("gap"), st.sampled_from(["request", "response"]), st.integers(0, 5000)),
        st.tuples(st.sampled_from(["req_eof", "resp_eof", "close"])),
    ),
    max_size=12,
)


@FUZZ
@given(ops=OPS, midstream=st.booleans())
def test_http1_tracker_survives_anything(ops: list[tuple], midstream: bool) -> None:
    t = Http1Tracker(midstream=midstream)
    t_ns = 0
    for op in ops:
        t_ns += 1
        if t.state is State.CLOSED:
            break
        try:
            if op[0] == "req":
                t.feed_request(op[1], t_ns)
            elif op[0] == "resp":
                t.feed_response(op[1], t_ns)
            elif op[0] == "gap":
                t.gap(op[1], op[2], t_ns)
            elif op[0] == "req_eof":
                t.feed_request_eof(t_ns)
            elif op[0] == "resp_eof":
                t.feed_response_eof(t_ns)
            else:
                t.close(t_ns)
        except PeerError as e:
            assert e.status in (400, 429, 431, 502)
        assert t.buffered <= 2 * (MAX_HEADER_BYTES + RESYNC_WINDOW) + 2 * 5100
        assert len(t.pending) <= MAX_PENDING_EXCHANGES
    for ex in t.close(t_ns + 1):
        pass


@FUZZ
@given(data=st.data(), stream=STREAM)
def test_http1_same_events_whatever_the_split(data: st.DataObject, stream: bytes) -> None:
    """Well-formed or not, where the bytes are cut must not change the exchanges recorded."""
    request = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    whole, split = Http1Tracker(), Http1Tracker()
    outcomes = []
    for t, chunks in [(whole, [stream]), (split, data.draw(splits(stream)))]:
        t.feed_request(request, 1)
        events = []
        try:
            for chunk in chunks:
                events += t.feed_response(chunk, 2)
            events += t.feed_response_eof(3)
        except PeerError as e:
            events += e.events
            events.append(("error", e.status))
        outcomes.append([(x.path, x.status, x.response_body_bytes, x.error) if hasattr(x, "path") else x for x in events
                         if hasattr(x, "path") or isinstance(x, tuple)])
    assert outcomes[0] == outcomes[1]


@FUZZ
@given(data=st.data(), blob=st.binary(max_size=600), side=st.sampled_from(["client", "server"]))
def test_tls_parser_survives_anything(data: st.DataObject, blob: bytes, side: str) -> None:
    parser = HelloParser(side)  # type: ignore[arg-type]
    for chunk in data.draw(splits(blob)):
        try:
            parser.feed(chunk)
        except ProtocolError:
            break
        assert parser.buffered <= MAX_RECORD_BYTES + 5 + MAX_HELLO_BYTES + 4
        if parser.state is not TlsState.READING:
            break


@FUZZ
@given(data=st.data(), flip=st.integers(0, 10_000), value=st.integers(0, 255))
def test_tls_parser_survives_a_mutated_hello(data: st.DataObject, flip: int, value: int) -> None:
    hello = bytearray(records(client_hello(sni_ext("a.example") + alpn_ext("h2")), split_at=(20,)))
    hello[flip % len(hello)] = value
    parser = HelloParser("client")
    try:
        for chunk in data.draw(splits(bytes(hello))):
            if parser.feed(chunk) is not None:
                break
    except ProtocolError:
        pass


@FUZZ
@given(blob=st.binary(max_size=64))
def test_sniff_is_total(blob: bytes) -> None:
    assert sniff(blob) in ("tls", "h2", "http/1.1", "tcp", "need_more")
    if len(blob) >= 24:
        assert sniff(blob) != "need_more"


def test_huge_body_keeps_memory_flat() -> None:
    t = Http1Tracker()
    t.feed_request(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 1073741824\r\n\r\n", 1)
    chunk = b"x" * 65536
    for i in range(256):  # 16 MiB here; the body is never kept
        t.feed_request(chunk, i)
        assert t.buffered == 0
    assert t.request.body_bytes == 256 * 65536


def test_endless_resync_garbage_keeps_memory_flat() -> None:
    t = Http1Tracker()
    t.gap("response", 10, 1)
    for i in range(200):
        t.feed_response(b"no status line here " * 100, i)
        assert t.buffered <= RESYNC_WINDOW
    assert t.response.skipped_bytes >= 200 * 2000 - RESYNC_WINDOW

"""H2Tracker as transcripts: bytes an `h2` client and server really wrote, each stream's exchange out."""
from __future__ import annotations

import struct
import tracemalloc

import h2.config
import h2.connection
import pytest
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.protocols.h2_tracker import (MAX_HEADER_LIST_BYTES, MAX_TRACKED_STREAMS, H2Exchange, H2Tracker,
                                           State, looks_like_h2)
from meshlens.protocols.sniff import H2_PREFACE


class Peers:
    """An h2 client and server wired through a tracker: what one writes is fed, then delivered."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                           validate_inbound_headers=False))
        self.tracker = H2Tracker()
        self.t = 1_000
        self.calls: list[H2Exchange] = []
        self.wire: list[tuple[bool, bytes]] = []  # (from the client?, bytes) in order
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.flush()

    def flush(self) -> None:
        for _ in range(4):  # settings ACKs answer settings
            c, s = self.client.data_to_send(), self.server.data_to_send()
            if not c and not s:
                return
            self.t += 1_000
            if c:
                self.wire.append((True, c))
                self.calls += self.tracker.feed_request(c, self.t)
                self.server.receive_data(c)
            if s:
                self.wire.append((False, s))
                self.calls += self.tracker.feed_response(s, self.t)
                self.client.receive_data(s)

    def request(self, path: str, body: bytes = b"", grpc: bool = False, extra: list | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [(":method", "POST" if body or grpc else "GET"), (":scheme", "http"), (":authority", "api"),
                   (":path", path)] + ([("content-type", "application/grpc"), ("te", "trailers")] if grpc else [])
        self.client.send_headers(sid, headers + (extra or []), end_stream=not body)
        if body:
            self.client.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def respond(self, sid: int, status: int = 200, body: bytes = b"", trailers: list | None = None,
                grpc: bool = False) -> None:
        headers = [(":status", str(status))] + ([("content-type", "application/grpc")] if grpc else [])
        self.server.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            self.server.send_data(sid, body, end_stream=not trailers)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.flush()


def summary(ex: H2Exchange) -> tuple:
    return (ex.stream_id, ex.method, ex.path, ex.status, ex.grpc_status, ex.grpc_message, ex.request_body_bytes,
            ex.response_body_bytes, ex.error)


def test_one_exchange_per_stream_with_bodies_and_times() -> None:
    p = Peers()
    a = p.request("/a?q=1")
    b = p.request("/b", body=b"x" * 3000)
    p.respond(b, 201, b"y" * 20)
    p.respond(a, 404, b"no")
    assert [summary(c) for c in p.calls] == [(3, "POST", "/b", 201, -1, "", 3000, 20, ""),
                                            (1, "GET", "/a", 404, -1, "", 0, 2, "")]
    first = p.calls[1]
    assert first.authority == "api" and first.version == "2" and not first.grpc
    assert 0 < first.request_start_ns < first.response_start_ns <= first.response_end_ns
    assert p.tracker.state is State.FRAMES and not p.tracker.streams and p.tracker.buffered == 0


def test_grpc_trailers_percent_decoded_and_trailers_only() -> None:
    p = Peers()
    ok = p.request("/pkg.Svc/Get", b"\0\0\0\0\x02hi", grpc=True)
    p.respond(ok, body=b"\0\0\0\0\x01z", trailers=[("grpc-status", "0")], grpc=True)
    bad = p.request("/pkg.Svc/Fail", b"\0\0\0\0\0", grpc=True)
    p.respond(bad, body=b"", trailers=[("grpc-status", "5"), ("grpc-message", "no%20such%20thing%C3%A9")], grpc=True)
    only = p.request("/pkg.Svc/Only", b"\0\0\0\0\0", grpc=True)
    p.server.send_headers(only, [(":status", "200"), ("content-type", "application/grpc"),
                                 ("grpc-status", "14"), ("grpc-message", "down")], end_stream=True)
    p.flush()
    assert [summary(c) for c in p.calls] == [
        (1, "POST", "/pkg.Svc/Get", 200, 0, "", 7, 6, ""),
        (3, "POST", "/pkg.Svc/Fail", 200, 5, "no such thingé", 5, 0, ""),
        (5, "POST", "/pkg.Svc/Only", 200, 14, "down", 5, 0, "")]
    assert all(c.grpc for c in p.calls)


def test_reset_streams_are_calls_and_say_who_reset() -> None:
    p = Peers()
    a = p.request("/slow")
    p.client.reset_stream(a, error_code=8)
    p.flush()
    b = p.request("/refused")
    p.server.reset_stream(b, error_code=7)
    p.flush()
    assert [(c.path, c.error, c.reset_by, c.reset_code, c.incomplete) for c in p.calls] == [
        ("/slow", "reset", "client", "CANCEL", True), ("/refused", "reset", "server", "REFUSED_STREAM", True)]


def test_goaway_ends_streams_above_its_last_id_and_close_ends_the_rest() -> None:
    p = Peers()
    ids = [p.request(f"/s{i}") for i in range(3)]
    p.server.close_connection(last_stream_id=ids[0])
    p.flush()
    assert [(c.path, c.error, c.reset_code) for c in p.calls] == [("/s1", "goaway", "NO_ERROR"),
                                                                 ("/s2", "goaway", "NO_ERROR")]
    assert [(c.path, c.error) for c in p.tracker.close(p.t + 1, "reset")] == [("/s0", "reset")]
    assert p.tracker.state is State.CLOSED


def test_interim_response_padding_priority_and_unknown_frames() -> None:
    p = Peers()
    sid = p.request("/up", extra=[("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")])
    p.server.send_headers(sid, [(":status", "103")])
    p.server.send_headers(sid, [(":status", "200")])
    p.server.send_data(sid, b"abc", pad_length=10)
    p.flush()
    unknown = struct.pack("!I", (5 << 8) | 0xEE) + b"\0" + struct.pack("!I", sid) + b"hello"
    p.calls += p.tracker.feed_response(unknown, p.t)
    p.server.send_data(sid, b"de", end_stream=True)
    p.flush()
    assert [summary(c) for c in p.calls] == [(1, "GET", "/up", 200, -1, "", 0, 5, "")]
    assert p.calls[0].traceparent.startswith("00-111")


def test_bytes_split_one_at_a_time_give_the_same_exchanges() -> None:
    p = Peers()
    for i in range(3):
        sid = p.request(f"/p{i}", body=b"b" * (i * 700))
        p.respond(sid, body=b"r" * 50, trailers=[("grpc-status", str(i))], grpc=True)
    tracker, calls = H2Tracker(), []
    for n, (client, data) in enumerate(p.wire):
        feed = tracker.feed_request if client else tracker.feed_response
        for i in range(len(data)):
            calls += feed(data[i:i + 1], n)
    assert [summary(c) for c in calls] == [summary(c) for c in p.calls] and len(calls) == 3


def bomb_block() -> bytes:
    """A header block of a few KiB that decodes into far more than MAX_HEADER_LIST_BYTES."""
    enc = Encoder()
    first = enc.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), ("x-big", "v" * 4000)])
    return first + bytes([0x80 | 62]) * 1000  # index 62: the 4 KiB entry just added, 1000 times


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", (len(payload) << 8) | ftype) + bytes([flags]) + struct.pack("!I", sid) + payload


def test_hpack_bomb_is_refused_and_the_connection_given_up() -> None:
    tr = H2Tracker()
    tracemalloc.start()
    try:
        out = tr.feed_request(H2_PREFACE + frame(4, 0, 0, b"") + frame(1, 0x5, 1, bomb_block()), 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == [] and tr.state is State.UNDECODED
    assert tr.undecoded.startswith(f"header list above MAX_HEADER_LIST_BYTES {MAX_HEADER_LIST_BYTES}")
    assert peak < 4 * MAX_HEADER_LIST_BYTES  # refused as it passed the limit, not after 4 MB were decoded
    assert tr.feed_request(frame(1, 0x5, 3, Encoder().encode([(":path", "/later")])), 2) == []  # not guessed


def test_continuation_flood_and_oversized_frames_give_up() -> None:
    tr = H2Tracker()
    tr.feed_request(H2_PREFACE + frame(1, 0, 1, b"\x82"), 1)
    for _ in range(100):
        tr.feed_request(frame(9, 0, 1, b"\0" * 1000), 1)
    assert tr.state is State.UNDECODED and "CONTINUATION flood" in tr.undecoded and tr.buffered == 0
    big = H2Tracker()
    big.feed_response(struct.pack("!I", 20_000 << 8) + b"\0\0\0\0\1", 1)
    assert big.undecoded.startswith("FRAME_SIZE_ERROR")


def test_max_frame_size_as_the_peer_announced_it() -> None:
    tr = H2Tracker()
    tr.feed_request(H2_PREFACE + frame(4, 0, 0, struct.pack("!HI", 5, 1 << 20)) +
                    frame(1, 0x4, 1, Encoder().encode([(":method", "GET"), (":path", "/big")])), 1)
    tr.feed_response(frame(1, 0x4, 1, Encoder().encode([(":status", "200")])), 2)
    tr.feed_response(frame(0, 0, 1, b"z" * 100_000), 3)
    out = tr.feed_response(frame(0, 0x1, 1, b""), 4)
    assert [(c.path, c.response_body_bytes) for c in out] == [("/big", 100_000)]


def request_block(enc: Encoder, path: str) -> bytes:
    return enc.encode([(":method", "GET"), (":scheme", "http"), (":path", path), ("x-pad", path * 200)])


def test_hpack_table_as_the_receiver_announced_it() -> None:
    """The client's blocks are decoded under the table size the server announced, and no larger."""
    bigger = H2Tracker()
    bigger.feed_response(frame(4, 0, 0, struct.pack("!HI", 1, 8192)), 0)  # the server: up to 8 KiB
    enc = Encoder()
    enc.header_table_size = 8192  # the client uses it (a table size update opens its first block)
    bigger.feed_request(H2_PREFACE + frame(4, 0, 0, b""), 1)
    for i in range(4):
        bigger.feed_request(frame(1, 0x5, 2 * i + 1, request_block(enc, f"/p{i}")), 2)
    assert bigger.state is State.FRAMES and sorted(bigger.streams) == [1, 3, 5, 7]
    assert [bigger.streams[7].ex.path] == ["/p3"]

    default = H2Tracker()  # nothing announced: 4096, so the same update is refused
    enc = Encoder()
    enc.header_table_size = 8192
    default.feed_request(H2_PREFACE + frame(4, 0, 0, b"") + frame(1, 0x5, 1, request_block(enc, "/x")), 1)
    assert default.state is State.UNDECODED and default.undecoded.startswith("COMPRESSION_ERROR: InvalidTableSize")
    assert default.streams == {}


def test_too_many_streams_stay_bounded_and_rapid_resets_are_calls() -> None:
    tr = H2Tracker()
    enc = Encoder()
    calls = tr.feed_request(H2_PREFACE + frame(4, 0, 0, b""), 0)
    n = MAX_TRACKED_STREAMS + 50
    for i in range(n):
        calls += tr.feed_request(frame(1, 0x4, 2 * i + 1, enc.encode([(":method", "GET"), (":path", f"/o{i}")])), i)
    assert len(tr.streams) == MAX_TRACKED_STREAMS
    assert [(c.path, c.error) for c in calls] == [(f"/o{i}", "untracked") for i in range(50)]
    resets: list[H2Exchange] = []
    for i in range(n, n + 2000):
        sid = 2 * i + 1
        resets += tr.feed_request(frame(1, 0x4, sid, enc.encode([(":method", "GET"), (":path", "/r")])) +
                                  frame(3, 0, sid, struct.pack("!I", 8)), i)
    assert len(tr.streams) == MAX_TRACKED_STREAMS - 1 and tr.buffered == 0  # one evicted by the first reset
    assert sum(1 for c in resets if c.path == "/r" and c.reset_code == "CANCEL") == 2000


def test_midstream_and_gap_are_undecoded_with_the_reason() -> None:
    assert H2Tracker(midstream=True).undecoded == "capture started mid-connection"
    p = Peers()
    sid = p.request("/cut")
    out = p.tracker.gap("response", 100, p.t)
    assert [(c.path, c.error) for c in out] == [("/cut", "gap")]
    assert "gap" in p.tracker.undecoded and p.tracker.state is State.UNDECODED
    p.respond(sid)
    assert p.calls == []


def test_looks_like_h2() -> None:
    settings_frame = frame(4, 0, 0, struct.pack("!HI", 3, 100))
    assert looks_like_h2(settings_frame + frame(8, 0, 0, b"\0\0\0\1") + frame(0, 0, 1, b"abc"))
    assert not looks_like_h2(settings_frame[:-1])
    assert not looks_like_h2(b"GET / HTTP/1.1\r\n\r\n")
    assert not looks_like_h2(frame(6, 0, 0, b"1234567"))  # PING is 8 bytes


def test_driving_a_closed_tracker_is_a_bug() -> None:
    tr = H2Tracker()
    tr.close(1)
    with pytest.raises(Exception, match="CLOSED"):
        tr.feed_request(b"x", 2)


# -- fuzzing the frame layer ---------------------------------------------------------------

_frames = st.builds(frame, st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
                    st.binary(max_size=64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.one_of(_frames, st.binary(max_size=40))), max_size=30),
       st.booleans())
def test_random_frame_streams_never_raise(chunks: list[tuple[bool, bytes]], preface: bool) -> None:
    tr = H2Tracker()
    if preface:
        tr.feed_request(H2_PREFACE, 0)
    for i, (client, data) in enumerate(chunks):
        out = tr.feed_request(data, i) if client else tr.feed_response(data, i)
        assert all(isinstance(c, H2Exchange) for c in out)
        assert tr.buffered <= 9 + 60 * 1024
    tr.close(len(chunks))
    assert not tr.streams


def _real_transcript() -> list[tuple[bool, bytes]]:
    p = Peers()
    for i in range(3):
        sid = p.request(f"/pkg.S/M{i}", b"\0\0\0\0\1x", grpc=True)
        p.respond(sid, body=b"\0\0\0\0\1y", trailers=[("grpc-status", "0")], grpc=True)
    return p.wire


REAL = _real_transcript()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 4096), st.integers(0, 255)), max_size=6))
def test_mutated_real_transcripts_never_raise_and_later_connections_decode(mutations: list) -> None:
    chunks = [(c, bytearray(d)) for c, d in REAL]
    for which, at, value in mutations:
        data = chunks[which][1]
        if data:
            data[at % len(data)] = value
    tr = H2Tracker()
    for i, (client, data) in enumerate(chunks):
        tr.feed_request(bytes(data), i) if client else tr.feed_response(bytes(data), i)
    tr.close(len(chunks))
    fresh = H2Tracker()
    calls = [c for i, (client, data) in enumerate(REAL)
             for c in (fresh.feed_request(data, i) if client else fresh.feed_response(data, i))]
    assert [(c.path, c.grpc_status) for c in calls] == [(f"/pkg.S/M{i}", 0) for i in range(3)]


def test_a_pushed_stream_is_a_call_with_the_promised_request() -> None:
    p = Peers()
    sid = p.request("/page")
    pushed = p.server.get_next_available_stream_id()
    p.server.push_stream(sid, pushed, [(":method", "GET"), (":scheme", "http"), (":authority", "api"),
                                       (":path", "/style.css")])
    p.respond(sid, body=b"<html>")
    p.respond(pushed, body=b"body{}")
    assert [summary(c) for c in p.calls] == [(1, "GET", "/page", 200, -1, "", 0, 6, ""),
                                            (2, "GET", "/style.css", 200, -1, "", 0, 6, "")]


_ops = st.lists(st.tuples(st.sampled_from(["open", "head", "data", "end", "trailers", "rst_c", "rst_s", "goaway",
                                           "ping"]), st.integers(0, 20)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_every_stream_opened_is_one_call_whatever_the_order(ops: list[tuple[str, int]]) -> None:
    """Well-formed frames in any order the protocol allows or not: one exchange per stream, exactly."""
    tr, c_enc, s_enc = H2Tracker(), Encoder(), Encoder()
    out = tr.feed_request(H2_PREFACE + frame(4, 0, 0, b""), 0) + tr.feed_response(frame(4, 0, 0, b""), 0)
    opened: list[int] = []
    for t, (op, n) in enumerate(ops, 1):
        sid = 2 * n + 1
        if op == "open":
            if opened and sid <= max(opened):
                continue  # a stream id is used once, upwards
            opened.append(sid)
            data = frame(1, 0x4, sid, c_enc.encode([(":method", "GET"), (":path", f"/s{sid}")]))
        elif op == "head":
            data = frame(1, 0x4, sid, s_enc.encode([(":status", "200"), ("content-type", "application/grpc")]))
        elif op == "data":
            data = frame(0, 0, sid, b"d" * n)
        elif op == "end":
            data = frame(0, 0x1, sid, b"")
        elif op == "trailers":
            data = frame(1, 0x5, sid, s_enc.encode([("grpc-status", str(n % 17))]))
        elif op in ("rst_c", "rst_s"):
            data = frame(3, 0, sid, struct.pack("!I", n % 14))
        elif op == "goaway":
            data = frame(7, 0, 0, struct.pack("!II", sid, 0))
        else:
            data = frame(6, 0, 0, b"12345678")
        client = op in ("open", "rst_c")
        out += tr.feed_request(data, t) if client else tr.feed_response(data, t)
    out += tr.close(len(ops) + 1)
    assert tr.undecoded == ""
    assert sorted(c.stream_id for c in out) == sorted(opened)
    assert all(c.path == f"/s{c.stream_id}" for c in out)

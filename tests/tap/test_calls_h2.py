"""The tap over h2c captures: one call per stream, gRPC named as the record names it, undecodable
connections once with the reason. The bytes are what the `h2` package's client and server wrote."""
from __future__ import annotations

import h2.config
import h2.connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector.record import Call
from meshlens.mesh import parse as parse_mesh
from tests.tap.pcapgen import Flow
from tests.tap.test_calls import capture, conv

GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


class Conversation:
    """An h2 client and server; `wire` is what each wrote, in order, as (direction, bytes)."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.wire: list[tuple[int, bytes]] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.flush()

    def flush(self) -> None:
        for _ in range(4):
            c, s = self.client.data_to_send(), self.server.data_to_send()
            if c:
                self.wire.append((0, c))
                self.server.receive_data(c)
            if s:
                self.wire.append((1, s))
                self.client.receive_data(s)

    def call(self, path: str, status: int = 200, body: bytes = b"", answer: bytes = b"",
             trailers: list | None = None, grpc: bool = False, extra: list | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(":method", "POST" if grpc or body else "GET"), (":scheme", "http"),
                                       (":authority", "api:50051"), (":path", path)] + (GRPC if grpc else [])
                                 + (extra or []), end_stream=not body)
        if body:
            self.client.send_data(sid, body, end_stream=True)
        self.flush()
        if status:
            self.server.send_headers(sid, [(":status", str(status))] + (GRPC[:1] if grpc else []),
                                     end_stream=not answer and not trailers)
            if answer:
                self.server.send_data(sid, answer, end_stream=not trailers)
            if trailers:
                self.server.send_headers(sid, trailers, end_stream=True)
            self.flush()
        return sid


def row(c: Call) -> tuple:
    return (c.protocol, c.method, c.path, c.route, c.status, c.grpc_status, c.attributes.get("grpc.message"),
            c.request_bytes, c.response_bytes, c.error)


def test_each_stream_is_a_call_grpc_named_by_its_method_path() -> None:
    conv_ = Conversation()
    conv_.call("/pkg.Greeter/Hello", body=b"\0\0\0\0\3abc", answer=b"\0\0\0\0\1z",
               trailers=[("grpc-status", "0")], grpc=True)
    conv_.call("/pkg.Greeter/Fail", body=b"\0\0\0\0\0", trailers=[("grpc-status", "7"),
                                                                  ("grpc-message", "not%20allowed")], grpc=True)
    conv_.call("/index.html?x=1", status=404, answer=b"nope",
               extra=[("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")])
    mesh = parse_mesh({"services": {"web": {"instances": [{"address": "10.0.0.1:40000"}]},
                                    "greeter": {"instances": [{"address": "10.0.0.2:50051"}]}}})
    calls = capture(conv(Flow(server_port=50051), conv_.wire), mesh=mesh)
    assert [row(c) for c in calls] == [
        ("grpc", "/pkg.Greeter/Hello", "/pkg.Greeter/Hello", "/pkg.Greeter/Hello", 200, 0, None, 8, 6, ""),
        ("grpc", "/pkg.Greeter/Fail", "/pkg.Greeter/Fail", "/pkg.Greeter/Fail", 200, 7, "not allowed", 5, 0, ""),
        ("h2", "GET", "/index.html", "", 404, -1, None, 0, 4, "")]
    assert {(c.src_service, c.dst_service, c.observer, c.authority) for c in calls} == {
        ("web", "greeter", "wire", "api:50051")}
    assert calls[2].trace_id == "a" * 32 and [c.attributes["h2.stream_id"] for c in calls] == ["1", "3", "5"]
    assert all(0 < int(c.attributes["ttfb_ns"]) <= c.duration_ns for c in calls)


def test_resets_and_a_connection_cut_mid_stream() -> None:
    conv_ = Conversation()
    sid = conv_.call("/pkg.S/Slow", status=0, body=b"\0\0\0\0\0", grpc=True)
    conv_.client.reset_stream(sid, error_code=8)  # what a gRPC client does at its deadline
    conv_.flush()
    conv_.call("/pkg.S/Open", status=0, body=b"\0\0\0\0\0", grpc=True)
    calls = capture(conv(Flow(), conv_.wire, close="rst"))
    assert [(c.path, c.error, c.attributes.get("h2.reset"), c.response_flags, c.attributes.get("incomplete"))
            for c in calls] == [("/pkg.S/Slow", "reset", "CANCEL", "DR", "reset"),
                                ("/pkg.S/Open", "reset", None, "", "reset")]


def test_capture_begun_mid_connection_is_one_h2_call_with_the_reason() -> None:
    conv_ = Conversation()
    for i in range(3):
        conv_.call(f"/p{i}", answer=b"x" * 10)
    later = conv_.wire[3:]  # the preface and SETTINGS were before the capture
    calls = capture(conv(Flow(), later, handshake=False))
    assert [(c.protocol, c.path, c.method, c.attributes.get("h2.undecoded"), c.attributes.get("midstream"))
            for c in calls] == [("h2", "", "", "capture started mid-connection", "true")]
    assert (calls[0].request_bytes, calls[0].response_bytes) == (sum(len(d) for w, d in later if w == 0),
                                                                 sum(len(d) for w, d in later if w == 1))


def test_a_gap_ends_the_decoding_but_keeps_the_calls_before_it() -> None:
    conv_ = Conversation()
    conv_.call("/before", answer=b"ok")
    conv_.call("/lost", answer=b"y" * 3000)
    conv_.call("/after", answer=b"ok")
    items = conv(Flow(), conv_.wire, mss=1000)
    lost = [i for i, (_, seg) in enumerate(items) if b"y" * 100 in seg.payload][0]
    del items[lost]
    calls = capture(items)
    assert [(c.protocol, c.path, c.error) for c in calls] == [
        ("h2", "/before", ""), ("h2", "/lost", "incomplete"), ("h2", "", "incomplete")]
    assert "gap" in calls[2].attributes["h2.undecoded"]


def test_malformed_frames_after_good_streams() -> None:
    conv_ = Conversation()
    conv_.call("/good")
    wire = conv_.wire + [(0, b"\0\0\x08\x06\0\0\0\0\0" + b"12345678"), (0, b"\xff" * 30)]  # a PING, then garbage
    calls = capture(conv(Flow(), wire))
    assert [(c.protocol, c.path, c.error) for c in calls] == [("h2", "/good", ""), ("h2", "", "")]
    assert calls[1].attributes["h2.undecoded"].startswith("FRAME_SIZE_ERROR")


def _transcript() -> list[tuple[int, bytes]]:
    conv_ = Conversation()
    for i in range(3):
        conv_.call(f"/pkg.S/M{i}", body=b"\0\0\0\0\1q", answer=b"\0\0\0\0\1a", trailers=[("grpc-status", "0")],
                   grpc=True)
    return conv_.wire


WIRE = _transcript()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(WIRE) - 1), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
                max_size=5))
def test_mutated_h2_captures_never_crash_and_the_next_connection_decodes(mutations: list) -> None:
    wire = [(d, bytearray(b)) for d, b in WIRE]
    for which, at, value in mutations:
        data = wire[which][1]
        data[at % len(data):at % len(data) + len(value)] = value
    broken = conv(Flow(client_port=40001), [(d, bytes(b)) for d, b in wire])
    good = conv(Flow(client_port=40002), WIRE)
    calls = capture(broken + good)
    assert [(c.path, c.grpc_status) for c in calls if c.src_port == 40002] == [(f"/pkg.S/M{i}", 0) for i in range(3)]
    assert any(c.src_port == 40001 for c in calls)  # the broken connection is recorded, whatever it became


def test_a_connection_without_streams_is_one_call_with_its_bytes() -> None:
    wire = Conversation().wire  # preface and SETTINGS each way, their ACKs, no request
    calls = capture(conv(Flow(), wire))
    assert [(c.protocol, c.path, c.request_bytes, c.response_bytes, c.error, "h2.undecoded" in c.attributes)
            for c in calls] == [("h2", "", sum(len(b) for d, b in wire if d == 0),
                                 sum(len(b) for d, b in wire if d == 1), "", False)]

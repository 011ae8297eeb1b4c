"""What an HTTP/2 client can send wrong, sent to a real sidecar over a socket: malformed frames, an HPACK bomb,
too many streams at once, rapid resets (CVE-2023-44487), arbitrary frames (fuzzed). Each offending connection
gets GOAWAY with the right code and is closed; the sidecar goes on serving everyone else."""
from __future__ import annotations

import json
import socket
import struct

import grpc
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.proxy.h2_connection import MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_BYTES
from meshlens.proxy.h2_downstream import PREMATURE_RESET_MIN_STREAMS
from meshlens.protocols.sniff import H2_PREFACE
from tests.grpc_peers import SERVICE, grpc_server
from tests.proxy.processes import ProxyProcess
from tests.proxy.test_policies import stats
from tests.waiting import PATIENCE_S

PROTOCOL_ERROR, ENHANCE_YOUR_CALM = 0x1, 0xB
_HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x1, 0x3, 0x4, 0x7
_END_STREAM, _END_HEADERS = 0x1, 0x4


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """The inbound sidecar of `backend`, a grpcio server its app."""
    with grpc_server() as port:
        proxy = ProxyProcess(tmp_path_factory.mktemp("h2-input") / "b", json.dumps({"services": {"backend": {}}}),
                             "backend", "--app-port", str(port), "--no-record").start()
        try:
            yield proxy
        finally:
            proxy.stop()
            proxy.kill()


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def request_block(encoder: hpack.Encoder, extra: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    return encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Hello"),
                           (":authority", "backend"), ("content-type", "application/grpc"), *extra])


def connect(proxy: ProxyProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.inbound), timeout=PATIENCE_S)
    s.sendall(H2_PREFACE + frame(_SETTINGS, 0, 0))
    return s


def goaway_code(s: socket.socket) -> int | None:
    """Read until the sidecar closes: the error code of its GOAWAY (None if it sent none)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    s.close()
    pos, code = 0, None
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        if data[pos + 3] == _GOAWAY:
            code = struct.unpack(">I", data[pos + 13:pos + 17])[0]
        pos += 9 + length
    return code


def still_serves(proxy: ProxyProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{proxy.inbound}") as ch:
        assert ch.unary_unary(f"/{SERVICE}/Hello")(b"you", timeout=PATIENCE_S) == b"hi you"


def test_a_malformed_frame_is_goaway_protocol_error_and_others_are_served(sidecar) -> None:
    before = stats(sidecar)["downstream_cx_http2_protocol_error"]
    s = connect(sidecar)
    s.sendall(frame(0x0, 0, 0, b"x"))  # DATA on stream 0 (RFC 9113 6.1: a connection error)
    assert goaway_code(s) == PROTOCOL_ERROR
    assert stats(sidecar)["downstream_cx_http2_protocol_error"] == before + 1
    still_serves(sidecar)


def test_an_hpack_bomb_is_refused_as_it_grows_with_enhance_your_calm(sidecar) -> None:
    encoder = hpack.Encoder()
    value = "a" * 4000
    block = request_block(encoder, [("x-bomb", value)] * 30)  # one table entry referenced 30 times: ~4 KiB sent
    assert len(block) < 8192 and 30 * len(value) > MAX_HEADER_LIST_BYTES
    s = connect(sidecar)
    s.sendall(frame(_HEADERS, _END_HEADERS, 1, block[:16384]))
    assert goaway_code(s) == ENHANCE_YOUR_CALM
    still_serves(sidecar)


def test_more_streams_than_settings_allow_is_goaway(sidecar) -> None:
    encoder = hpack.Encoder()
    s = connect(sidecar)
    opened = b"".join(frame(_HEADERS, _END_HEADERS, 2 * i + 1, request_block(encoder))  # bodies never sent
                      for i in range(MAX_CONCURRENT_STREAMS + 1))
    s.sendall(opened)
    assert goaway_code(s) == PROTOCOL_ERROR
    still_serves(sidecar)


def test_rapid_resets_close_the_connection_with_enhance_your_calm(sidecar) -> None:
    before = stats(sidecar)["downstream_cx_http2_premature_resets"]
    encoder = hpack.Encoder()
    s = connect(sidecar)
    burst = b"".join(frame(_HEADERS, _END_HEADERS, 2 * i + 1, request_block(encoder))
                     + frame(_RST_STREAM, 0, 2 * i + 1, struct.pack(">I", 0x8))  # CANCEL at once
                     for i in range(PREMATURE_RESET_MIN_STREAMS * 2))
    try:
        s.sendall(burst)
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while the burst was still going in
    assert goaway_code(s) == ENHANCE_YOUR_CALM
    assert stats(sidecar)["downstream_cx_http2_premature_resets"] == before + 1
    still_serves(sidecar)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 9), st.binary(max_size=64)),
                min_size=1, max_size=6))
def test_fuzzed_frames_never_stop_the_sidecar_serving(sidecar, frames) -> None:
    encoder = hpack.Encoder()
    s = connect(sidecar)
    s.sendall(frame(_HEADERS, _END_HEADERS | _END_STREAM, 1, request_block(encoder)) +
              b"".join(frame(kind, flags, stream, payload) for kind, flags, stream, payload in frames))
    s.shutdown(socket.SHUT_WR)  # whatever the sidecar makes of it, it closes: a GOAWAY, or the end of the bytes
    goaway_code(s)
    still_serves(sidecar)


def test_a_client_that_stops_reading_stops_the_server_at_a_window_not_the_sidecars_memory(tmp_path) -> None:
    """The client opens a stream to a method that would send 64 MiB and never opens its window past the first
    64 KiB: the sidecar stops reading the server's stream once it holds STREAM_BUFFER, so the server is held at
    a window or two (never near the 64 messages), and the sidecar's peak memory stays far below 64 MiB; once the
    client reads on, every byte arrives."""
    import threading

    import h2.config
    import h2.connection
    import h2.events

    from meshlens.proxy.h2_connection import STREAM_WINDOW
    from tests.proxy.processes import rss_kb
    from tests.waiting import wait_until

    sent = [0]
    big = b"m" * (1 << 20)

    def flood(request: bytes, context: grpc.ServicerContext):
        for _ in range(64):
            sent[0] += 1
            yield big

    from tests.grpc_peers import METHODS

    with grpc_server({**METHODS, "Flood": grpc.unary_stream_rpc_method_handler(flood)}) as port:
        proxy = ProxyProcess(tmp_path / "b", json.dumps({"services": {"backend": {}}}), "backend",
                             "--app-port", str(port), "--no-record").start()
        try:
            still_serves(proxy)  # warmed: the connection to the app, the imports of a first stream
            before = rss_kb(proxy.proc.pid)
            s = socket.create_connection(("127.0.0.1", proxy.inbound), timeout=PATIENCE_S)
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            c.initiate_connection()
            c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Flood"),
                               (":authority", "backend"), ("content-type", "application/grpc"), ("te", "trailers")])
            c.send_data(1, struct.pack(">BI", 0, 0), end_stream=True)
            s.sendall(c.data_to_send())
            got, held, ended = [0], [0], threading.Event()

            def read(ack: bool) -> None:
                while not ended.is_set() and (data := s.recv(1 << 16)):
                    for ev in c.receive_data(data):
                        if isinstance(ev, h2.events.DataReceived):
                            got[0] += len(ev.data)
                            held[0] += ev.flow_controlled_length
                            if ack:
                                c.acknowledge_received_data(held[0], 1)
                                held[0] = 0
                        elif isinstance(ev, h2.events.StreamEnded):
                            ended.set()
                    s.sendall(c.data_to_send())
                    if not ack and got[0] >= 65535:
                        return  # the client's window is shut: it reads no more
            read(ack=False)
            with pytest.raises(AssertionError):  # never: the server is held at the windows
                wait_until(lambda: sent[0] >= 20, "the server sending past the windows", timeout=5)
            assert sent[0] <= 2 + 2 * STREAM_WINDOW // len(big), sent
            c.acknowledge_received_data(held[0], 1)  # the client reads on: its window opens again
            held[0] = 0
            s.sendall(c.data_to_send())
            read(ack=True)
            assert ended.is_set() and got[0] == 64 * (5 + len(big))
            with open(f"/proc/{proxy.proc.pid}/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            assert peak - before < 24 * 1024, (before, peak)  # KiB: far from the 64 MiB sent
            s.close()
        finally:
            proxy.stop()
            proxy.kill()

"""tap/calls.py: generated conversations in, exact call records out."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector.record import Call
from meshlens.mesh import parse as parse_mesh
from meshlens.tap.calls import Tap, parse_traceparent
from tests.tap.pcapgen import LINKTYPE_OF, Flow, Seg

T0 = 1_700_000_000_000_000_000
STEP = 1_000


def capture(items: list[tuple[Flow, Seg]], link: str = "eth", **kw) -> list[Call]:
    """Frames through a Tap, one every STEP ns from T0; the calls, capture end included."""
    calls: list[Call] = []
    tap = Tap(calls.append, **kw)
    for i, (flow, seg) in enumerate(items):
        tap.feed(T0 + i * STEP, LINKTYPE_OF[link], flow.frame(seg, link))
    tap.finish()
    return calls


def conv(flow: Flow, exchanges: list[tuple[int, bytes]], **kw) -> list[tuple[Flow, Seg]]:
    return [(flow, s) for s in flow.conversation(exchanges, **kw)]


def http(call: Call) -> tuple:
    return (call.method, call.authority, call.path, call.status, call.request_bytes, call.response_bytes, call.error)


def req(method: str = "GET", path: str = "/a", body: bytes = b"", extra: str = "") -> bytes:
    cl = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: api\r\n{extra}{cl}\r\n".encode() + body


def resp(status: int = 200, body: bytes = b"ok", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_keep_alive_exchanges_with_times_and_addresses() -> None:
    flow = Flow()
    calls = capture(conv(flow, [(0, req(path="/a?q=1")), (1, resp(body=b"hello")), (0, req("POST", "/b", b"xyz")),
                                (1, resp(201, b""))]))
    assert [http(c) for c in calls] == [("GET", "api", "/a", 200, 0, 5, ""), ("POST", "api", "/b", 201, 3, 0, "")]
    first = calls[0]
    # SYN, SYN-ACK, ACK, then the request at packet 3 and the response at packet 4
    assert (first.time, first.duration_ns, first.attributes["ttfb_ns"]) == (T0 + 3 * STEP, STEP, str(STEP))
    assert (first.observer, first.observer_id, first.protocol, first.tls) == ("wire", "tap", "http/1.1", False)
    assert (first.src_addr, first.src_port, first.src_service) == ("10.0.0.1", 40000, "10.0.0.1:40000")
    assert (first.dst_addr, first.dst_port, first.dst_service, first.dst_subset) == ("10.0.0.2", 80, "10.0.0.2:80", "")


def test_pipelined_requests_pair_in_order() -> None:
    flow = Flow()
    calls = capture(conv(flow, [(0, req(path="/1") + req(path="/2") + req(path="/3")),
                                (1, resp(200, b"a") + resp(404, b"bb")), (1, resp(500, b"ccc"))]))
    assert [(c.path, c.status, c.response_bytes) for c in calls] == [("/1", 200, 1), ("/2", 404, 2), ("/3", 500, 3)]


def test_chunked_response_split_across_segments() -> None:
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (b"x" * 3000, b"y" * 10)) + b"0\r\n\r\n"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    calls = capture(conv(Flow(), [(0, req()), (1, chunked), (0, req(path="/n")), (1, resp())]))
    assert [(c.path, c.status, c.response_bytes, c.error) for c in calls] == [("/a", 200, 3010, ""), ("/n", 200, 2, "")]


def test_head_and_304_have_no_body() -> None:
    calls = capture(conv(Flow(), [(0, req("HEAD", "/h")), (1, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
                                  (0, req(path="/c", extra="If-None-Match: \"e\"\r\n")),
                                  (1, b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"),
                                  (0, req(path="/z")), (1, resp(body=b"zz"))]))
    assert [(c.method, c.path, c.status, c.response_bytes) for c in calls] == [
        ("HEAD", "/h", 200, 0), ("GET", "/c", 304, 0), ("GET", "/z", 200, 2)]


def test_lost_segment_marks_one_call_incomplete_then_resyncs() -> None:
    flow = Flow()
    big = resp(body=b"b" * 4000)  # three segments at mss 1460
    items = conv(flow, [(0, req(path="/1")), (1, big), (0, req(path="/2")), (1, resp(body=b"fine"))])
    lost = [s for s in items if s[1].direction == 1 and s[1].payload][1]  # the middle of the first response
    items.remove(lost)
    calls = capture(items)
    assert [(c.path, c.status, c.error) for c in calls] == [("/1", 200, "incomplete"), ("/2", 200, "")]
    assert calls[0].attributes["incomplete"] == "gap"
    assert calls[1].response_bytes == 4


def test_lost_request_keeps_pairing() -> None:
    flow = Flow()
    items = conv(flow, [(0, req(path="/1")), (1, resp()), (0, req(path="/2")), (1, resp(404)), (0, req(path="/3")),
                        (1, resp(202))])
    lost = [s for s in items if s[1].direction == 0 and s[1].payload][1]
    items.remove(lost)
    calls = capture(items)
    assert [(c.path, c.status, c.error) for c in calls] == [("/1", 200, ""), ("", 404, "incomplete"), ("/3", 202, "")]


def test_traceparent_and_reset() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    items = conv(Flow(), [(0, req(extra=f"traceparent: {tp}\r\n")), (1, resp()), (0, req(path="/cut"))], close="rst")
    calls = capture(items)
    assert [(c.path, c.status, c.trace_id, c.span_id, c.error) for c in calls] == [
        ("/a", 200, "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", ""), ("/cut", 0, "", "", "reset")]
    assert parse_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") == ("", "")
    assert parse_traceparent("garbage") == ("", "")


def test_connection_already_open_when_capture_began() -> None:
    flow = Flow(client_port=51000, server_port=8080)
    body = b"q" * 100
    items = conv(flow, [(0, b"tail of an earlier body" + req(path="/m")), (1, resp(body=body))], handshake=False)
    calls = capture(items)
    assert [(c.path, c.status, c.response_bytes, c.attributes.get("midstream")) for c in calls] == [
        ("/m", 200, 100, "true")]


def test_names_from_the_mesh() -> None:
    mesh = parse_mesh({"services": {
        "web": {"instances": [{"address": "10.0.0.1:40000"}]},
        "api": {"instances": [{"address": "10.0.0.2:80", "labels": {"version": "v2"}}],
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}}},
    }})
    calls = capture(conv(Flow(), [(0, req()), (1, resp())]), mesh=mesh, observer_id="tap-7")
    assert [(c.src_service, c.dst_service, c.dst_subset, c.observer_id) for c in calls] == [("web", "api", "v2", "tap-7")]
    other = capture(conv(Flow(server="10.0.0.9"), [(0, req()), (1, resp())]), mesh=mesh)
    assert [(c.src_service, c.dst_service, c.dst_subset) for c in other] == [("web", "10.0.0.9:80", "")]


def test_h2_preface_is_one_connection_call() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0"
    items = conv(Flow(), [(0, preface), (1, b"\0\0\0\x04\0\0\0\0\0"), (0, b"x" * 100)])
    calls = capture(items)
    assert [(c.protocol, c.request_bytes, c.response_bytes, c.method, c.error) for c in calls] == [
        ("h2", len(preface) + 100, 9, "", "")]
    assert calls[0].time == T0 and calls[0].duration_ns == (len(items) - 2) * STEP  # to the second FIN


def test_plain_tcp_server_first_and_client_first() -> None:
    server_first = conv(Flow(client_port=40001, server_port=22), [(1, b"SSH-2.0-OpenSSH_9.2\r\n"), (0, b"SSH-2.0-x\r\n")])
    client_first = conv(Flow(client_port=40002, server_port=6379), [(0, b"*1\r\n$4\r\nPING\r\n"), (1, b"+PONG\r\n")])
    calls = capture(server_first + client_first)
    assert sorted((c.protocol, c.dst_port, c.request_bytes, c.response_bytes, c.attributes["close"]) for c in calls) == [
        ("tcp", 22, 11, 21, "fin"), ("tcp", 6379, 14, 7, "fin")]


def test_handshake_only_and_lost_first_bytes_are_tcp() -> None:
    quiet = conv(Flow(client_port=40003), [])
    lossy = conv(Flow(client_port=40004), [(0, b"GET /x HTTP/1.1\r\n" + b"H" * 2000 + b"\r\n\r\n"), (1, resp())])
    first_data = [s for s in lossy if s[1].payload][0]
    lossy.remove(first_data)
    calls = capture(quiet + lossy)
    assert sorted((c.src_port, c.protocol, c.error) for c in calls) == [(40003, "tcp", ""), (40004, "tcp", "incomplete")]


@pytest.fixture(scope="module")
def tls_transcript(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, bytes]]:
    """A real TLS 1.3 handshake and one request each way, via ssl.MemoryBIO, as (direction, bytes)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=api.example", "-days", "1"],
                   check=True, capture_output=True)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.set_alpn_protocols(["h2", "http/1.1"])
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    sctx.set_alpn_protocols(["http/1.1"])
    bios = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    c = cctx.wrap_bio(*bios[0], server_hostname="api.example")
    s = sctx.wrap_bio(*bios[1], server_side=True)
    out: list[tuple[int, bytes]] = []
    for _ in range(6):
        for end, d_, (_, outgoing), (peer_in, _) in ((c, 0, bios[0], bios[1]), (s, 1, bios[1], bios[0])):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = outgoing.read()
            if data:
                out.append((d_, data))
                peer_in.write(data)
    c.write(b"GET / HTTP/1.1\r\nHost: api.example\r\n\r\n")
    out.append((0, bios[0][1].read()))
    return out


def test_tls_connection_is_one_call_with_sni_version_alpn(tls_transcript: list[tuple[int, bytes]]) -> None:
    flow = Flow(server_port=443)
    calls = capture(conv(flow, tls_transcript))
    assert len(calls) == 1
    c = calls[0]
    assert (c.protocol, c.tls, c.authority, c.method, c.error) == ("tls", True, "api.example", "", "")
    assert c.attributes["tls_version"] == "TLSv1.3"
    assert c.attributes["tls_client_alpn"] == "h2,http/1.1"
    assert c.attributes["tls_client_versions"] == "TLSv1.3,TLSv1.2"
    assert c.request_bytes == sum(len(b) for d, b in tls_transcript if d == 0)
    assert c.response_bytes == sum(len(b) for d, b in tls_transcript if d == 1)


def test_loopback_duplicates_count_once() -> None:
    flow = Flow(client="127.0.0.1", server="127.0.0.1", client_port=50000, server_port=8080)
    items = [x for x in conv(flow, [(0, req()), (1, resp()), (0, req(path="/2")), (1, resp(404))]) for _ in (0, 1)]
    calls = capture(items, link="sll2")
    assert [(c.path, c.status, c.error) for c in calls] == [("/a", 200, ""), ("/2", 404, "")]


def test_many_interleaved_connections() -> None:
    flows = [Flow(client_port=41000 + i, client_isn=1000 + i * 7919, server_isn=0xFFFFFF00 + i) for i in range(50)]
    per = [conv(f, [(0, req(path=f"/{i}")), (1, resp(200 + i % 3, b"x" * (i * 37)))]) for i, f in enumerate(flows)]
    items = [seq[k] for k in range(max(map(len, per))) for seq in per if k < len(seq)]
    calls = capture(items)
    assert sorted((c.src_port, c.path, c.status, c.response_bytes, c.error) for c in calls) == [
        (41000 + i, f"/{i}", 200 + i % 3, i * 37, "") for i in range(50)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(set(LINKTYPE_OF.values()))), st.binary(max_size=120)), max_size=40))
def test_garbage_frames_never_crash(frames: list[tuple[int, bytes]]) -> None:
    calls: list[Call] = []
    tap = Tap(calls.append)
    for i, (lt, frame) in enumerate(frames):
        tap.feed(T0 + i, lt, frame)
    tap.finish()


_STREAM_PIECES = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n",
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HEAD /h HTTP/1.1\r\n",
    b"CONNECT a:1 HTTP/1.1\r\n", b"\x00\xff", b"Expect: 100-continue\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 1), st.lists(st.one_of(_STREAM_PIECES, st.binary(max_size=30)), max_size=6)
                          .map(b"".join)), max_size=12),
       st.sets(st.integers(0, 30), max_size=3), st.booleans(), st.sampled_from(["fin", "rst", None]))
def test_garbage_streams_never_crash(exchanges: list[tuple[int, bytes]], drop: set[int], handshake: bool,
                                     close: str | None) -> None:
    flow = Flow()
    items = conv(flow, [(d, b) for d, b in exchanges if b], mss=50, handshake=handshake, close=close)
    items = [x for i, x in enumerate(items) if i not in drop]
    calls = capture(items)
    for c in calls:
        assert c.protocol in ("http/1.1", "tls", "h2", "tcp")
        assert c.duration_ns >= 0 and c.request_bytes >= 0 and c.response_bytes >= 0


def test_100_continue_and_upgrade_to_a_tunnel() -> None:
    post = b"POST /up HTTP/1.1\r\nHost: api\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    ws = b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    items = conv(Flow(), [(0, post), (1, b"HTTP/1.1 100 Continue\r\n\r\n"), (0, b"hello"), (1, resp(201, b"")),
                          (0, ws), (1, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
                          (0, b"\x81\x02hi"), (1, b"\x81\x03bye")])
    calls = capture(items)
    assert [(c.protocol, c.method, c.path, c.status, c.request_bytes, c.response_bytes, c.error) for c in calls] == [
        ("http/1.1", "POST", "/up", 201, 5, 0, ""), ("http/1.1", "GET", "/ws", 101, 0, 0, ""), ("tcp", "", "", 0, 4, 5, "")]
    assert calls[1].attributes["upgraded"] == "true" and calls[2].attributes["tunnel"] == "upgrade"

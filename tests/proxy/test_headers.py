"""proxy/headers.py as transcripts: trace context in and out; heads in, the heads the proxy sends out."""
from __future__ import annotations

import re

from meshlens.protocols.http1 import RequestReader, ResponseReader
from meshlens.proxy.headers import PEER_HEADER, new_request_id, peer_field, request_head, response_head, trace_for

INCOMING = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued_with_a_new_span():
    t = trace_for(INCOMING)
    assert t.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert t.parent_span_id == "00f067aa0ba902b7"
    assert re.fullmatch(r"[0-9a-f]{16}", t.span_id) and t.span_id != t.parent_span_id
    assert t.header() == f"00-{t.trace_id}-{t.span_id}-01".encode()


def test_sampling_flags_are_kept():
    assert trace_for(INCOMING[:-2] + b"00").header().endswith(b"-00")


def test_absent_or_invalid_traceparent_starts_a_trace():
    for bad in (None, b"", b"garbage", b"ff-" + INCOMING[3:], b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
                INCOMING.upper(), b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01"):
        t = trace_for(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", t.trace_id) and t.trace_id != "0" * 32
        assert t.parent_span_id == "" and t.flags == "01"


def test_a_later_version_is_continued_as_w3c_says():
    t = trace_for(b"01-" + INCOMING[3:])
    assert (t.trace_id, t.parent_span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert t.header().startswith(b"00-")  # we send the version we speak


def test_request_ids_are_uuid_shaped_and_distinct():
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)


def heads(raw: bytes) -> list:
    class Keep:
        def __init__(self) -> None:
            self.heads: list = []

        def on_request(self, head) -> None:
            self.heads.append(head)

        def on_response(self, head) -> None:
            self.heads.append(head)

    k = Keep()
    if raw.startswith(b"HTTP/"):
        r = ResponseReader(k)
        r.expect("GET")
    else:
        r = RequestReader(k, extra=frozenset({PEER_HEADER}))
    r.feed(raw)
    return k.heads


def test_a_request_head_is_forwarded_as_received_with_fields_spliced_in():
    raw = b"GET /a HTTP/1.1\r\nHost: h\r\nX-Odd:  spaced  \r\ncOnTeNt-TyPe: a/b\r\n\r\n"
    (head,) = heads(raw)
    t = trace_for(None)
    out = request_head(head, t, b"rid", peer_field("web"))
    assert out == (b"GET /a HTTP/1.1\r\ntraceparent: " + t.header() + b"\r\nx-request-id: rid\r\n"
                   b"x-meshlens-peer: web\r\nHost: h\r\nX-Odd:  spaced  \r\ncOnTeNt-TyPe: a/b\r\n\r\n")


def test_our_fields_replace_the_incoming_ones_and_hop_by_hop_fields_go():
    raw = (b"POST /p HTTP/1.1\r\nTraceParent: " + INCOMING + b"\r\nX-Meshlens-Peer: forged\r\nKeep-Alive: 5\r\n"
           b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\nTransfer-Encoding: chunked\r\nx-request-id: r1\r\n\r\n")
    (head,) = heads(raw)
    t = trace_for(head.traceparent)
    out = request_head(head, t, None, b"")
    assert out == (b"POST /p HTTP/1.1\r\ntraceparent: " + t.header() + b"\r\nTransfer-Encoding: chunked\r\n"
                   b"x-request-id: r1\r\n\r\n")  # the body keeps its framing hop to hop


def test_an_upgrade_keeps_its_upgrade_fields():
    (head,) = heads(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    out = request_head(head, trace_for(None), None, b"")
    assert out.endswith(b"\r\nHost: h\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n")


def test_a_response_head_passes_unchanged_unless_it_must_say_close():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    (head,) = heads(ok)
    assert response_head(head, False) is head.raw
    assert response_head(head, True) == b"HTTP/1.1 200 OK\r\nconnection: close\r\nContent-Length: 2\r\n\r\n"
    (head,) = heads(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n")
    assert response_head(head, False) == ok
    assert response_head(head, True).count(b"onnection") == 1

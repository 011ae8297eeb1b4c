"""proxy/headers.py as transcripts: trace context in, trace context out; hop-by-hop names."""
from __future__ import annotations

import re

from meshlens.proxy.headers import HOP_BY_HOP, forwardable, hop_by_hop_names, new_request_id, trace_for

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
    for bad in (None, b"", b"garbage", b"01-" + INCOMING[3:], b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
                INCOMING.upper(), b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01"):
        t = trace_for(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", t.trace_id) and t.trace_id != "0" * 32
        assert t.parent_span_id == "" and t.flags == "01"


def test_request_ids_are_uuid_shaped_and_distinct():
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)


def test_connection_names_more_hop_by_hop_fields():
    assert hop_by_hop_names([(b"Host", b"x")]) == HOP_BY_HOP
    names = hop_by_hop_names([(b"Connection", b"close, X-Private ,"), (b"connection", b"Foo")])
    assert {b"close", b"x-private", b"foo"} <= names and HOP_BY_HOP <= names


def test_forwardable_keeps_end_to_end_fields_byte_for_byte():
    head = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"gzip, chunked"), (b"keep-alive", b"timeout=5"),
            (b"X-Private", b"1"), (b"Connection", b"keep-alive, X-Private"), (b"cOnTeNt-LeNgTh", b"5"), (b"Upgrade", b"h2c")]
    assert forwardable(head) == (b"Content-Type: text/plain\r\ncOnTeNt-LeNgTh: 5\r\n", True, True)
    assert forwardable([(b"A", b"b  c")]) == (b"A: b  c\r\n", False, False)

"""tap/reassembly.py: segments in adversarial orders, events out (transcripts and properties)."""
from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.tap.packets import ACK, FIN, PSH, RST, SYN, PacketDecoder
from meshlens.tap.reassembly import (
    CLOSED_LINGER_NS, HOLE_WAIT_NS, IDLE_TIMEOUT_NS, MAX_PENDING_BYTES, Close, Conn, Data, Event, Gap, Open,
    Reassembler,
)
from tests.tap.pcapgen import Flow, Seg

T0 = 1_700_000_000_000_000_000
STEP = 1_000  # 1 µs between packets
REQ = b"GET /a HTTP/1.1\r\nHost: b\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + bytes(range(256)) * 15 + b"x" * 160


def conn_of(flow: Flow) -> Conn:
    return Conn(ipaddress.ip_address(flow.client).packed, flow.client_port,
                ipaddress.ip_address(flow.server).packed, flow.server_port)


def run(items: list[tuple[Flow, Seg]], link: str = "eth", r: Reassembler | None = None,
        t0: int = T0, step: int = STEP) -> list[Event]:
    """Frames through the decoder into a reassembler; the events in order."""
    r = r if r is not None else Reassembler()
    dec = PacketDecoder()
    linktype = {"eth": 1, "vlan": 1, "sll": 113, "sll2": 276, "ipv6": 229, "raw": 101}[link]
    out: list[Event] = []
    for i, (flow, seg) in enumerate(items):
        out += r.feed(dec.decode(linktype, flow.frame(seg, link)), t0 + i * step)
    return out


def streams(events: list[Event]) -> dict[tuple[Conn, str], bytes]:
    got: dict[tuple[Conn, str], bytes] = {}
    for e in events:
        if isinstance(e, Data):
            got[e.conn, e.direction] = got.get((e.conn, e.direction), b"") + e.data
    return got


def kinds(events: list[Event]) -> list[tuple]:
    """A transcript without times: (type, direction or reason, bytes or size)."""
    out: list[tuple] = []
    for e in events:
        if isinstance(e, Open):
            out.append(("open", e.midstream))
        elif isinstance(e, Data):
            out.append(("data", e.direction, e.data))
        elif isinstance(e, Gap):
            out.append(("gap", e.direction, e.nbytes))
        else:
            out.append(("close", e.reason))
    return out


FLOW = Flow()
CONV = FLOW.conversation([(0, REQ), (1, RESP)])  # SYN, SYN-ACK, ACK, req, 3 resp, FIN, FIN, ACK


def test_in_order_transcript() -> None:
    events = run([(FLOW, s) for s in CONV])
    assert kinds(events) == [
        ("open", False), ("data", "c2s", REQ),
        ("data", "s2c", RESP[:1460]), ("data", "s2c", RESP[1460:2920]), ("data", "s2c", RESP[2920:]),
        ("close", "fin"),
    ]
    assert all(e.conn == conn_of(FLOW) for e in events)
    assert events[0].t == T0 and events[-1].t == T0 + 8 * STEP


def test_reordered_segments_wait_for_the_hole() -> None:
    segs = CONV[:4] + [CONV[6], CONV[5], CONV[4]] + CONV[7:]
    events = run([(FLOW, s) for s in segs])
    assert kinds(events) == [("open", False), ("data", "c2s", REQ), ("data", "s2c", RESP), ("close", "fin")]


def test_loopback_capture_counts_every_packet_once() -> None:
    r = Reassembler()
    events = run([(FLOW, s) for s in CONV for _ in range(2)], r=r)
    assert streams(events) == {(conn_of(FLOW), "c2s"): REQ, (conn_of(FLOW), "s2c"): RESP}
    assert [k for k in kinds(events) if k[0] != "data"] == [("open", False), ("close", "fin")]
    assert r.stats.duplicate_bytes == len(REQ) + len(RESP)
    assert len(r) == 0


def test_overlap_after_delivery_first_copy_wins() -> None:
    # A forged segment over bytes 1000..2200 arrives after segment 1 (0..1460) and before segment 2:
    # its first 460 bytes lose to the delivered copy, the rest win over the later genuine copy.
    d = CONV[4]
    forged = Seg(1, d.seq + 1000, d.ack, ACK, b"EVIL" * 300)
    segs = CONV[:5] + [forged] + CONV[5:]
    want = RESP[:1460] + forged.payload[460:] + RESP[2200:]
    assert streams(run([(FLOW, s) for s in segs]))[conn_of(FLOW), "s2c"] == want


def test_overlap_of_buffered_bytes_first_copy_wins() -> None:
    # The 3rd response segment arrives first; then a retransmission covering segments 2 and 3 with other
    # bytes; then segment 1. The buffered copy of segment 3 wins over the later one, the later one fills 2.
    s1, s2, s3 = CONV[4:7]
    other = Seg(1, s2.seq, s2.ack, ACK, b"Z" * (len(s2.payload) + len(s3.payload)))
    events = run([(FLOW, s) for s in CONV[:4] + [s3, other, s1] + CONV[7:]])
    want = s1.payload + b"Z" * len(s2.payload) + s3.payload
    assert streams(events)[conn_of(FLOW), "s2c"] == want


def test_lost_segment_is_a_gap_once_no_retransmission_comes() -> None:
    segs = CONV[:5] + CONV[6:]  # the 2nd response segment is never seen
    r = Reassembler()
    events = run([(FLOW, s) for s in segs], r=r)
    # Both FINs are seen but a hole remains: wait HOLE_WAIT_NS for a retransmission, then skip it.
    assert kinds(events) == [("open", False), ("data", "c2s", REQ), ("data", "s2c", RESP[:1460])]
    assert r.expire(T0 + HOLE_WAIT_NS) == []
    assert kinds(r.expire(T0 + HOLE_WAIT_NS + 10 * STEP)) == [
        ("gap", "s2c", 1460), ("data", "s2c", RESP[2920:]), ("close", "fin")]


def test_lost_tail_before_fin_is_a_gap() -> None:
    segs = CONV[:6] + CONV[7:]  # the last response segment lost; the FIN after it is seen
    r = Reassembler()
    events = run([(FLOW, s) for s in segs], r=r) + r.close_all(T0 + 1)
    assert kinds(events)[-2:] == [("gap", "s2c", len(RESP) - 2920), ("close", "eof")]


def test_buffer_over_its_limit_skips_the_hole() -> None:
    big = random.Random(1).randbytes(MAX_PENDING_BYTES + 20_000)
    conv = FLOW.conversation([(0, REQ), (1, big)], close=None)
    segs = [s for s in conv if s.payload != big[:1460]]  # the first response segment is lost
    events = run([(FLOW, s) for s in segs])
    assert kinds(events)[:3] == [("open", False), ("data", "c2s", REQ), ("gap", "s2c", 1460)]
    assert streams(events)[conn_of(FLOW), "s2c"] == big[1460:]


def test_sequence_wraparound() -> None:
    flow = Flow(client_isn=0xFFFFFFFF - 20, server_isn=0xFFFFFFFF - 3000)
    conv = flow.conversation([(0, REQ * 100), (1, RESP * 3)])
    rng = random.Random(7)
    data = conv[3:-3]
    rng.shuffle(data)
    events = run([(flow, s) for s in conv[:3] + data + conv[-3:]])
    assert streams(events) == {(conn_of(flow), "c2s"): REQ * 100, (conn_of(flow), "s2c"): RESP * 3}
    assert kinds(events)[-1] == ("close", "fin")


def test_midstream_start_begins_at_the_first_seen_bytes() -> None:
    flow = Flow(client_port=51000, server_port=8080)
    conv = flow.conversation([(0, REQ), (1, RESP), (0, REQ)])
    events = run([(flow, s) for s in conv[5:]])  # no handshake, no request, no first response segment
    assert events[0] == Open(conn_of(flow), T0, midstream=True)  # the server is the lower port
    assert streams(events) == {(conn_of(flow), "s2c"): RESP[1460:], (conn_of(flow), "c2s"): REQ}
    assert kinds(events)[-1] == ("close", "fin")


def test_midstream_start_seen_from_the_server_side_first() -> None:
    conv = FLOW.conversation([(1, RESP), (0, REQ)], handshake=False)
    events = run([(FLOW, s) for s in conv])
    assert events[0].conn == conn_of(FLOW)
    assert [k[:2] for k in kinds(events)] == [("open", True), ("data", "s2c"), ("data", "s2c"), ("data", "s2c"),
                                             ("data", "c2s"), ("close", "fin")]


def test_rst_closes_and_flushes_what_waits() -> None:
    conv = FLOW.conversation([(0, REQ), (1, RESP)], close="rst")
    segs = conv[:4] + [conv[5], conv[6], conv[7]]  # first response segment lost, then RST from the client
    events = run([(FLOW, s) for s in segs])
    assert kinds(events) == [("open", False), ("data", "c2s", REQ), ("gap", "s2c", 1460),
                             ("data", "s2c", RESP[1460:]), ("close", "rst")]


def test_packets_after_close_do_not_reopen() -> None:
    r = Reassembler()
    late = [CONV[-1], CONV[-2], CONV[4], Seg(0, 1, 1, RST)]  # final ACK, FIN and data retransmitted, RST
    events = run([(FLOW, s) for s in CONV + late], r=r)
    assert [k[0] for k in kinds(events)].count("open") == 1
    assert r.stats.ignored == len(late) + 1  # + the final ACK of the conversation itself


def test_new_syn_after_close_is_a_new_connection() -> None:
    again = Flow(client_isn=77777, server_isn=99999).conversation([(0, b"second")])
    events = run([(FLOW, s) for s in CONV + again])
    assert [k for k in kinds(events) if k[0] != "data"] == [("open", False), ("close", "fin")] * 2
    assert kinds(events)[-2] == ("data", "c2s", b"second")


def test_new_syn_on_a_live_tuple_closes_the_old_connection() -> None:
    again = Flow(client_isn=77777, server_isn=99999).conversation([(0, b"second")])
    events = run([(FLOW, s) for s in CONV[:5] + again])
    assert [k for k in kinds(events) if k[0] != "data"] == [
        ("open", False), ("close", "reused"), ("open", False), ("close", "fin")]


def test_idle_connections_expire_and_time_wait_ends() -> None:
    r = Reassembler()
    run([(FLOW, s) for s in CONV[:5]], r=r)
    assert len(r) == 1
    assert r.expire(T0 + IDLE_TIMEOUT_NS - 1) == []
    assert kinds(r.expire(T0 + IDLE_TIMEOUT_NS + 10 * STEP)) == [("close", "idle")]
    assert len(r) == 0
    # Within TIME_WAIT a late data segment is ignored; after it, it opens a mid-stream connection.
    assert run([(FLOW, CONV[5])], r=r, t0=T0 + IDLE_TIMEOUT_NS + 20 * STEP) == []
    events = run([(FLOW, CONV[5])], r=r, t0=T0 + IDLE_TIMEOUT_NS + CLOSED_LINGER_NS + 30 * STEP)
    assert kinds(events)[0] == ("open", True)


def test_idle_expiry_happens_while_feeding() -> None:
    other = Flow(client_port=40001)
    r = Reassembler()
    run([(FLOW, s) for s in CONV[:5]], r=r)
    events = run([(other, s) for s in other.conversation([(0, REQ)])], r=r, t0=T0 + IDLE_TIMEOUT_NS + 10 * STEP)
    assert (events[0].conn, kinds(events)[0]) == (conn_of(FLOW), ("close", "idle"))


def test_syn_with_data_tcp_fast_open() -> None:
    conv = [Seg(0, 100, 0, SYN, b"GET"), Seg(1, 500, 104, SYN | ACK), Seg(0, 104, 501, ACK | PSH, b" /")]
    assert streams(run([(FLOW, s) for s in conv]))[conn_of(FLOW), "c2s"] == b"GET /"


def test_many_interleaved_connections_over_every_link() -> None:
    rng = random.Random(3)
    for link in ("vlan", "sll", "sll2", "ipv6"):
        v6 = link == "ipv6"
        flows = [Flow(client="fd00::1" if v6 else "10.0.0.1", server="fd00::2" if v6 else "10.0.0.2",
                      client_port=30000 + i, client_isn=rng.getrandbits(32), server_isn=rng.getrandbits(32))
                 for i in range(60)]
        want = {}
        queues = []
        for i, f in enumerate(flows):
            req, resp = REQ * (i % 4 + 1), RESP[: 500 + 97 * i]
            want[conn_of(f), "c2s"], want[conn_of(f), "s2c"] = req, resp
            queues.append([(f, s) for s in f.conversation([(0, req), (1, resp)], mss=536)])
        items = []
        while queues:  # interleave connections, keeping each one's own order
            q = rng.choice(queues)
            items.append(q.pop(0))
            if not q:
                queues.remove(q)
        events = run(items, link=link)
        assert streams(events) == want, link
        assert sum(isinstance(e, Close) and e.reason == "fin" for e in events) == len(flows)


def _pieces(draw: st.DrawFn, stream: bytes) -> list[tuple[int, bytes]]:
    """Random segments (offset, bytes) covering `stream`, overlapping each other."""
    out = []
    pos = 0
    while pos < len(stream):
        n = draw(st.integers(1, 400))
        back = draw(st.integers(0, min(pos, 300)))
        out.append((pos - back, stream[pos - back:pos + n]))
        pos += n
    return out


@st.composite
def captures(draw: st.DrawFn) -> tuple[Flow, list[Seg], bytes, bytes]:
    c2s = draw(st.binary(min_size=1, max_size=3000))
    s2c = draw(st.binary(min_size=0, max_size=3000))
    flow = Flow(client_isn=draw(st.integers(0, 2**32 - 1)), server_isn=draw(st.integers(0, 2**32 - 1)))
    hs = flow.conversation([], close=None)
    cseq, sseq = hs[2].seq, hs[1].seq + 1
    data = [Seg(0, (cseq + off) & 0xFFFFFFFF, 0, ACK, p) for off, p in _pieces(draw, c2s)]
    data += [Seg(1, (sseq + off) & 0xFFFFFFFF, 0, ACK, p) for off, p in _pieces(draw, s2c)]
    data.append(Seg(0, (cseq + len(c2s)) & 0xFFFFFFFF, 0, FIN | ACK))
    data.append(Seg(1, (sseq + len(s2c)) & 0xFFFFFFFF, 0, FIN | ACK))
    dups = draw(st.lists(st.sampled_from(data), max_size=20))
    data = draw(st.permutations(data + dups))
    return flow, hs + data, c2s, s2c


@settings(max_examples=300, deadline=None)
@given(captures())
def test_any_order_and_duplication_reassembles_the_original(capture: tuple[Flow, list[Seg], bytes, bytes]) -> None:
    flow, segs, c2s, s2c = capture
    events = run([(flow, s) for s in segs])
    got = streams(events)
    assert got.get((conn_of(flow), "c2s"), b"") == c2s
    assert got.get((conn_of(flow), "s2c"), b"") == s2c
    assert not any(isinstance(e, Gap) for e in events)
    assert kinds(events)[-1] == ("close", "fin")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
                          st.binary(max_size=50)), max_size=40),
       st.lists(st.integers(0, 10**10), min_size=40, max_size=40))
def test_arbitrary_segments_never_raise(segs: list[tuple[int, int, int, bytes]], times: list[int]) -> None:
    r = Reassembler()
    events: list[Event] = []
    for (d, seq, flags, payload), t in zip(segs, sorted(times)):
        events += run([(FLOW, Seg(d, seq, 0, flags, payload))], r=r, t0=t)
    events += r.close_all(10**10 + 1)
    opens = sum(isinstance(e, Open) for e in events)
    assert opens == sum(isinstance(e, Close) for e in events)
    assert len(r) == 0


@settings(max_examples=200, deadline=None)
@given(captures(), st.data())
def test_lost_segments_are_gaps_of_exactly_their_size(capture: tuple[Flow, list[Seg], bytes, bytes],
                                                      data: st.DataObject) -> None:
    flow, segs, c2s, s2c = capture
    kept = segs[:3] + [s for s in segs[3:] if not s.payload or data.draw(st.booleans())]
    r = Reassembler()
    events = run([(flow, s) for s in kept], r=r)
    events += r.close_all(T0 + len(kept) * STEP)
    for direction, stream in (("c2s", c2s), ("s2c", s2c)):
        pos = 0
        for e in events:
            if isinstance(e, Gap) and e.direction == direction:
                assert e.nbytes > 0
                pos += e.nbytes
            elif isinstance(e, Data) and e.direction == direction:
                assert e.data == stream[pos:pos + len(e.data)]  # every delivered byte where it belongs
                pos += len(e.data)
        assert pos == len(stream)  # and every byte delivered or counted in a gap


def test_ack_past_a_hole_is_a_gap_at_once_with_ack_gaps() -> None:
    # the request's second segment is lost; the server's answer acknowledges it: the capture missed it
    flow = Flow()
    conv = flow.conversation([(0, REQ * 200), (1, RESP)])  # the request in four segments
    lost = conv[4]
    segs = [s for s in conv if s is not lost]
    first_resp = next(i for i, s in enumerate(segs) if s.direction == 1 and s.payload)
    events = run([(flow, s) for s in segs[:first_resp + 1]], r=Reassembler(ack_gaps=True))
    assert ("gap", "c2s", len(lost.payload)) in kinds(events)
    gap_at = kinds(events).index(("gap", "c2s", len(lost.payload)))
    assert kinds(events)[gap_at + 1][:2] == ("data", "c2s")  # the bytes behind the hole, before the answer
    assert kinds(events)[-1][:2] == ("data", "s2c")
    # without ack_gaps the hole waits (for a retransmission, the buffer limit or the close)
    plain = run([(flow, s) for s in segs[:first_resp + 1]])
    assert not [k for k in kinds(plain) if k[0] == "gap"]

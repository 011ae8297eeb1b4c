"""pcapfile -> packets -> reassembly on generated capture files, damage included."""
from __future__ import annotations

from pathlib import Path

import pytest

from meshlens.tap.packets import PacketDecoder
from meshlens.tap.pcapfile import PcapError, read_packets
from meshlens.tap.reassembly import Close, Event, Reassembler
from tests.tap.pcapgen import Flow, write_pcap, write_pcapng
from tests.tap.test_reassembly import REQ, RESP, conn_of, kinds, streams

T0 = 1_700_000_000_000_000_000


def replay(path: Path) -> tuple[list[Event], str]:
    """Every event of a file, and the reader's error ('' if none); open connections end as 'eof'."""
    dec, r = PacketDecoder(), Reassembler()
    events: list[Event] = []
    error, last = "", T0
    try:
        for ts, lt, frame in read_packets(path):
            seg = dec.decode(lt, frame)
            if seg is not None:
                events += r.feed(seg, ts)
            last = ts
    except PcapError as e:
        error = str(e)
    return events + r.close_all(last), error


def test_loopback_pcapng_with_two_interfaces(tmp_path: Path) -> None:
    # A capture on "any" (SLL2) sees loopback traffic twice; a second interface (Ethernet, VLAN-tagged,
    # nanosecond timestamps) carries an IPv6 connection.
    lo = Flow(client="127.0.0.1", server="127.0.0.1", client_port=50000, server_port=8080)
    v6 = Flow(client="fd00::1", server="fd00::2", client_isn=0xFFFFFFF0)
    packets = []
    for seg in lo.conversation([(0, REQ), (1, RESP), (0, REQ), (1, RESP)]):
        packets += [(0, lo.frame(seg, "sll2"))] * 2
    for seg in v6.conversation([(0, REQ), (1, RESP)]):
        packets.append((1, v6.frame(seg, "vlan")))
    packets = [(iface, T0 + i * 1000, frame) for i, (iface, frame) in enumerate(packets)]
    path = tmp_path / "lo.pcapng"
    write_pcapng(str(path), [(276, None), (1, 9)], packets)
    events, error = replay(path)
    assert error == ""
    assert streams(events) == {(conn_of(lo), "c2s"): REQ * 2, (conn_of(lo), "s2c"): RESP * 2,
                               (conn_of(v6), "c2s"): REQ, (conn_of(v6), "s2c"): RESP}
    assert [(e.conn, e.reason) for e in events if isinstance(e, Close)] == [(conn_of(lo), "fin"), (conn_of(v6), "fin")]


def test_truncated_capture_keeps_what_was_read(tmp_path: Path) -> None:
    flow = Flow()
    frames = [flow.frame(s) for s in flow.conversation([(0, REQ), (1, RESP)])]
    path = tmp_path / "cut.pcap"
    write_pcap(str(path), [(T0 + i, f) for i, f in enumerate(frames)])
    path.write_bytes(path.read_bytes()[:-sum(16 + len(f) for f in frames[5:]) - 100])  # inside frame 5
    events, error = replay(path)
    assert error.startswith(f"{path}: truncated packet at byte") and error.endswith("after 4 packets")
    assert kinds(events) == [("open", False), ("data", "c2s", REQ), ("close", "eof")]


@pytest.mark.parametrize("link", ["eth", "sll", "raw"])
def test_corrupt_record_in_the_middle(tmp_path: Path, link: str) -> None:
    flow = Flow()
    frames = [flow.frame(s, link) for s in flow.conversation([(0, REQ), (1, RESP)])]
    path = tmp_path / "bad.pcap"
    write_pcap(str(path), [(T0 + i, f) for i, f in enumerate(frames)], linktype={"eth": 1, "sll": 113, "raw": 101}[link])
    data = bytearray(path.read_bytes())
    sixth = 24 + sum(16 + len(f) for f in frames[:5])
    data[sixth + 8:sixth + 12] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(data))
    events, error = replay(path)
    assert "corrupt record header" in error and "after 5 packets" in error
    assert kinds(events) == [("open", False), ("data", "c2s", REQ), ("data", "s2c", RESP[:1460]), ("close", "eof")]

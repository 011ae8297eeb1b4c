"""tap/packets.py: every link layer to the same TCP segment; garbage to None and a counter."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlens.tap.packets import ACK, PSH, SYN, PacketDecoder, TcpSegment, format_address
from tests.tap.pcapgen import (
    LINKTYPE_OF, Flow, Seg, ipv4_packet, ipv6_packet, tcp_header,
)

V4 = Flow()
V6 = Flow(client="fd00::1", server="fd00::2")
SEG = Seg(0, 0xFFFFFFF0, 77, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n")


def _expect(flow: Flow) -> TcpSegment:
    return TcpSegment(ipaddress.ip_address(flow.client).packed, ipaddress.ip_address(flow.server).packed,
                      flow.client_port, flow.server_port, SEG.seq, SEG.ack, SEG.flags, memoryview(SEG.payload))


@pytest.mark.parametrize("link", ["eth", "vlan", "qinq", "sll", "sll2", "raw", "ipv4", "null"])
def test_ipv4_on_every_link_layer(link: str) -> None:
    dec = PacketDecoder()
    got = dec.decode(LINKTYPE_OF[link], V4.frame(SEG, link))
    assert got == _expect(V4)
    assert bytes(got.payload) == SEG.payload
    assert dec.stats.tcp == 1


@pytest.mark.parametrize("link", ["eth", "vlan", "sll", "sll2", "raw", "ipv6", "null"])
def test_ipv6_on_every_link_layer(link: str) -> None:
    got = PacketDecoder().decode(LINKTYPE_OF[link], V6.frame(SEG, link))
    assert got == _expect(V6)


def test_ethernet_padding_is_not_payload() -> None:
    # A 54-byte pure ACK is padded to Ethernet's 60-byte minimum: IP's length says where TCP ends.
    frame = V4.frame(Seg(0, 1, 2, ACK), "eth") + b"\0" * 6
    got = PacketDecoder().decode(1, frame)
    assert got is not None and bytes(got.payload) == b""


def test_ipv4_options_are_skipped() -> None:
    c, s = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
    ip = ipv4_packet(c, s, tcp_header(1, 2, 3, 4, SYN) + b"x", options=b"\x01\x01\x01\x00")  # NOP NOP NOP EOL
    got = PacketDecoder().decode(101, ip)
    assert got is not None and (got.sport, got.dport, got.seq, bytes(got.payload)) == (1, 2, 3, b"x")


def test_ipv4_tso_zero_total_length_uses_the_frame() -> None:
    ip = bytearray(V4.frame(SEG, "ipv4"))
    ip[2:4] = b"\0\0"
    got = PacketDecoder().decode(228, bytes(ip))
    assert got is not None and bytes(got.payload) == SEG.payload


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x2010])  # MF; offset; both
def test_ipv4_fragments_are_counted_and_skipped(frag: int) -> None:
    c, s = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    dec = PacketDecoder()
    assert dec.decode(101, ipv4_packet(c, s, tcp_header(1, 2, 3, 4, SYN), frag=frag)) is None
    assert dec.stats.fragments == 1
    # Don't-fragment alone is not a fragment.
    assert dec.decode(101, ipv4_packet(c, s, tcp_header(1, 2, 3, 4, SYN), frag=0x4000)) is not None


def test_ipv6_extension_headers_are_skipped() -> None:
    c, s = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
    ext = [(0, b"\x01\x04\0\0\0\0"),                         # hop-by-hop, PadN
           (43, b"\0\0" + b"\0" * 4 + c),                     # routing type 0, 0 left, one address
           (44, b"\0\0" + b"\0\0\0\x07"),                     # atomic fragment (offset 0, M=0)
           (60, b"\x01\x04\0\0\0\0")]                         # destination options
    got = PacketDecoder().decode(229, ipv6_packet(c, s, tcp_header(5, 6, 7, 8, ACK) + b"hi", ext))
    assert got is not None and (got.sport, got.dport, got.seq, bytes(got.payload)) == (5, 6, 7, b"hi")


def test_ipv6_fragments_are_counted_and_skipped() -> None:
    c, s = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
    dec = PacketDecoder()
    assert dec.decode(229, ipv6_packet(c, s, tcp_header(5, 6, 7, 8, ACK), [(44, b"\0\x01\0\0\0\x07")])) is None
    assert dec.stats.fragments == 1


def test_not_tcp_and_unknown_link_types_are_counted() -> None:
    dec = PacketDecoder()
    c, s = b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    assert dec.decode(101, ipv4_packet(c, s, b"\0" * 8, proto=17)) is None  # UDP
    assert dec.decode(1, b"\xff" * 12 + b"\x08\x06" + b"\0" * 28) is None  # ARP
    assert dec.decode(147, V4.frame(SEG, "eth")) is None
    assert (dec.stats.not_tcp, dec.stats.unknown_linktype) == (2, 1)


@pytest.mark.parametrize("link", ["eth", "vlan", "sll", "sll2", "raw"])
def test_every_truncation_gives_none_and_a_count(link: str) -> None:
    for flow in (V4, V6):
        frame = flow.frame(SEG, link)
        dec = PacketDecoder()
        header_len = len(frame) - len(SEG.payload)
        for cut in range(header_len + len(SEG.payload)):
            assert dec.decode(LINKTYPE_OF[link], frame[:cut]) is None, cut
        assert dec.stats.truncated + dec.stats.malformed == header_len + len(SEG.payload)


def test_impossible_header_values_are_malformed() -> None:
    dec = PacketDecoder()
    frame = bytearray(V4.frame(SEG, "ipv4"))
    frame[0] = 0x44  # IHL 16 bytes
    assert dec.decode(228, bytes(frame)) is None
    frame = bytearray(V4.frame(SEG, "ipv4"))
    frame[20 + 12] = 0x30  # TCP data offset 12 bytes
    assert dec.decode(228, bytes(frame)) is None
    assert dec.stats.malformed == 2


def test_format_address() -> None:
    assert format_address(b"\x0a\0\0\x01", 80) == "10.0.0.1:80"
    assert format_address(ipaddress.ip_address("::1").packed, 443) == "[::1]:443"


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(sorted(set(LINKTYPE_OF.values())) + [147]), st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(linktype: int, frame: bytes) -> None:
    dec = PacketDecoder()
    got = dec.decode(linktype, frame)
    assert got is None or isinstance(got, TcpSegment)
    assert sum(getattr(dec.stats, f) for f in dec.stats.__slots__) == 1  # each frame counted once


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(["eth", "vlan", "sll", "sll2", "raw"]), st.data())
def test_mutated_real_frames_never_raise(link: str, data: st.DataObject) -> None:
    frame = bytearray(data.draw(st.sampled_from([V4, V6])).frame(SEG, link))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    PacketDecoder().decode(LINKTYPE_OF[link], bytes(frame[:cut]))

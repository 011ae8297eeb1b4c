"""The fast path for headers: a captured frame in, one TCP segment (or None) out.

Link layers: Ethernet (with any number of 802.1Q / 802.1ad tags), Linux cooked
capture SLL and SLL2, BSD loopback (NULL) and raw IP. Network: IPv4 (options
skipped, fragments counted and skipped) and IPv6 (hop-by-hop, routing,
destination-options and atomic-fragment headers skipped; real fragments counted
and skipped). Only the fixed header fields the reassembler needs are read, with
`struct.unpack_from` on a memoryview: scapy's full dissection measured ~10k
packets/s here, which is why the tap does not use it per packet.

A frame that is truncated or is garbage gives None and a counter in
`DecodeStats`, never an exception: the tap reads untrusted bytes off the wire.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import ip_address
from typing import NamedTuple

# Link types (https://www.tcpdump.org/linktypes.html).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
LINKTYPES: frozenset[int] = frozenset(
    {LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL,
     LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2}
)

# TCP flag bits (RFC 9293).
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_ETH_VLAN = frozenset({0x8100, 0x88A8, 0x9100})  # 802.1Q, 802.1ad, old QinQ
# BSD loopback's address family is in host byte order; IPv6 differs per OS.
_NULL_AF_INET = frozenset({2, 0x02000000})
_NULL_AF_INET6 = frozenset({24, 28, 30, 0x18000000, 0x1C000000, 0x1E000000})
# IPv6 extension headers that are skipped to reach TCP: hop-by-hop, routing,
# destination options (all "(len + 1) * 8" bytes long).
_IPV6_SKIPPABLE = frozenset({0, 43, 60})
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_PROTO_TCP = 6
# Enough extension headers for any real packet; bounds the work on garbage.
MAX_IPV6_EXTENSION_HEADERS = 8

_u16 = struct.Struct("!H").unpack_from
_tcp = struct.Struct("!HHIIBB").unpack_from  # ports, seq, ack, data offset, flags
_ipv4 = struct.Struct("!BxHxxHxB").unpack_from  # ver/ihl, total length, frag, proto
_null_af = struct.Struct("=I").unpack_from
# The common case in one unpack: Ethernet, IPv4 without options, TCP.
_ETH_IPV4_TCP = struct.Struct("!12xHBxHxxHxBxx4s4sHHIIBB")
_eth_ipv4_tcp = _ETH_IPV4_TCP.unpack_from
_ETH_IPV4_TCP_LEN = _ETH_IPV4_TCP.size  # 54


class TcpSegment(NamedTuple):
    """One TCP segment. Addresses are packed (4 or 16 bytes): cheap to hash and compare."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: memoryview


def format_address(ip: bytes, port: int) -> str:
    """`10.0.0.1:80` or `[::1]:80`, as call records name an address nobody maps."""
    addr = ip_address(ip)
    return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"


@dataclass(slots=True)
class DecodeStats:
    """What the decoder skipped, by reason. Frames that gave a segment are `tcp`."""

    tcp: int = 0
    not_tcp: int = 0
    """IP but not TCP (UDP, ICMP, ...), or not IP at all (ARP, LLDP, ...)."""
    fragments: int = 0
    """IP fragments: skipped, not reassembled (TCP avoids them with PMTU discovery)."""
    truncated: int = 0
    """Shorter than its headers or its IP length say (snaplen too small, or damage)."""
    malformed: int = 0
    """Impossible header values (IP version, header length, TCP data offset)."""
    unknown_linktype: int = 0


class PacketDecoder:
    """Decodes frames of any supported link type; counts what it skips in `stats`."""

    def __init__(self) -> None:
        self.stats = DecodeStats()

    def decode(self, linktype: int, frame: bytes | memoryview) -> TcpSegment | None:
        """The TCP segment in `frame`, or None (counted in `stats`)."""
        mv = frame if isinstance(frame, memoryview) else memoryview(frame)
        n = len(mv)
        if linktype == LINKTYPE_ETHERNET and n >= _ETH_IPV4_TCP_LEN:
            etype, vihl, total, frag, proto, src, dst, sport, dport, seq, ack, doff, flags = _eth_ipv4_tcp(mv)
            if etype == _ETH_IPV4 and vihl == 0x45 and proto == _PROTO_TCP and not frag & 0x3FFF:
                end = 14 + total if total else n
                hlen = (doff >> 4) * 4
                if 54 <= 34 + hlen <= end <= n:
                    self.stats.tcp += 1
                    return TcpSegment(src, dst, sport, dport, seq, ack, flags, mv[34 + hlen:end])
        try:
            if linktype == LINKTYPE_ETHERNET:
                off = 12
                etype = _u16(mv, 12)[0]
                while etype in _ETH_VLAN:
                    off += 4
                    etype = _u16(mv, off)[0]
                off += 2
            elif linktype == LINKTYPE_LINUX_SLL:
                etype = _u16(mv, 14)[0]
                off = 16
            elif linktype == LINKTYPE_LINUX_SLL2:
                etype = _u16(mv, 0)[0]
                off = 20
            elif linktype == LINKTYPE_RAW:
                if n == 0:
                    self.stats.truncated += 1
                    return None
                version = mv[0] >> 4
                etype = _ETH_IPV4 if version == 4 else _ETH_IPV6 if version == 6 else 0
                if not etype:
                    self.stats.malformed += 1
                    return None
                off = 0
            elif linktype == LINKTYPE_IPV4:
                etype, off = _ETH_IPV4, 0
            elif linktype == LINKTYPE_IPV6:
                etype, off = _ETH_IPV6, 0
            elif linktype == LINKTYPE_NULL:
                af = _null_af(mv, 0)[0]
                etype = _ETH_IPV4 if af in _NULL_AF_INET else _ETH_IPV6 if af in _NULL_AF_INET6 else 0
                off = 4
            else:
                self.stats.unknown_linktype += 1
                return None
        except struct.error:
            self.stats.truncated += 1
            return None
        if etype == _ETH_IPV4:
            return self._ipv4(mv, off, n)
        if etype == _ETH_IPV6:
            return self._ipv6(mv, off, n)
        self.stats.not_tcp += 1
        return None

    def _ipv4(self, mv: memoryview, off: int, n: int) -> TcpSegment | None:
        if n - off < 20:
            self.stats.truncated += 1
            return None
        vihl, total, frag, proto = _ipv4(mv, off)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20:
            self.stats.malformed += 1
            return None
        if frag & 0x3FFF:  # more-fragments flag or a fragment offset
            self.stats.fragments += 1
            return None
        if proto != _PROTO_TCP:
            self.stats.not_tcp += 1
            return None
        # A total length of 0 is what TSO (segmentation offload) leaves in
        # captures of outgoing packets: the frame's length is the truth then.
        end = off + total if total else n
        if total and total < ihl:
            self.stats.malformed += 1
            return None
        if end > n:
            self.stats.truncated += 1
            return None
        return self._tcp(mv, off + ihl, end, bytes(mv[off + 12:off + 16]), bytes(mv[off + 16:off + 20]))

    def _ipv6(self, mv: memoryview, off: int, n: int) -> TcpSegment | None:
        if n - off < 40:
            self.stats.truncated += 1
            return None
        if mv[off] >> 4 != 6:
            self.stats.malformed += 1
            return None
        plen = _u16(mv, off + 4)[0]
        nh = mv[off + 6]
        src = bytes(mv[off + 8:off + 24])
        dst = bytes(mv[off + 24:off + 40])
        end = off + 40 + plen if plen else n  # 0: jumbogram or TSO, as for IPv4
        if end > n:
            self.stats.truncated += 1
            return None
        p = off + 40
        for _ in range(MAX_IPV6_EXTENSION_HEADERS):
            if nh == _PROTO_TCP:
                return self._tcp(mv, p, end, src, dst)
            if p + 8 > end:
                self.stats.truncated += 1
                return None
            if nh in _IPV6_SKIPPABLE:
                nh, p = mv[p], p + (mv[p + 1] + 1) * 8
            elif nh == _IPV6_FRAGMENT:
                if _u16(mv, p + 2)[0] & 0xFFF9:  # offset or M flag: a real fragment
                    self.stats.fragments += 1
                    return None
                nh, p = mv[p], p + 8  # an atomic fragment: the whole packet
            elif nh == _IPV6_AH:
                nh, p = mv[p], p + (mv[p + 1] + 2) * 4
            else:
                self.stats.not_tcp += 1
                return None
        self.stats.malformed += 1
        return None

    def _tcp(self, mv: memoryview, p: int, end: int, src: bytes, dst: bytes) -> TcpSegment | None:
        if end - p < 20:
            self.stats.truncated += 1
            return None
        sport, dport, seq, ack, doff, flags = _tcp(mv, p)
        hlen = (doff >> 4) * 4
        if hlen < 20:
            self.stats.malformed += 1
            return None
        if p + hlen > end:
            self.stats.truncated += 1
            return None
        self.stats.tcp += 1
        return TcpSegment(src, dst, sport, dport, seq, ack, flags, mv[p + hlen:end])

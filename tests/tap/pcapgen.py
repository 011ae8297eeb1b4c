"""Test helper: TCP conversations built as captured frames, written as pcap or pcapng.

`Flow.conversation` gives the segments of a conversation with correct sequence
and acknowledgement numbers; the tests reorder, duplicate, drop or alter them,
turn them into frames of any link type with `Flow.frame`, and write files with
`write_pcap` / `write_pcapng`.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

from meshlens.tap.packets import ACK, FIN, PSH, RST, SYN

Link = Literal["eth", "vlan", "qinq", "sll", "sll2", "raw", "ipv4", "ipv6", "null"]
LINKTYPE_OF: dict[str, int] = {
    "eth": 1, "vlan": 1, "qinq": 1, "sll": 113, "sll2": 276, "raw": 101, "ipv4": 228, "ipv6": 229, "null": 0,
}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int, options: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       doff << 4, flags, 65535, 0, 0) + options


def ipv4_packet(src: bytes, dst: bytes, payload: bytes, proto: int = 6, options: bytes = b"",
                frag: int = 0, ident: int = 1) -> bytes:
    ihl = (20 + len(options)) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag, 64, proto, 0, src, dst)
    hdr += options
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6_packet(src: bytes, dst: bytes, payload: bytes, extensions: list[tuple[int, bytes]] = ()) -> bytes:
    """`extensions`: (header type, body after the 2-byte next-header/length prefix) in order."""
    chain = b""
    types = [t for t, _ in extensions] + [6]
    for i, (_t, body) in enumerate(extensions):
        if types[i] == 44:  # fragment header: fixed 8 bytes, no length field
            chain += bytes([types[i + 1], 0]) + body
        else:
            chain += bytes([types[i + 1], (2 + len(body)) // 8 - 1]) + body
    first = types[0]
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(payload), first, 64, src, dst) + chain + payload


def link_frame(link: str, ip: bytes) -> bytes:
    """Wrap an IP packet in the given link layer."""
    etype = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    if link in ("eth", "vlan", "qinq"):
        tags = {"eth": b"", "vlan": struct.pack("!HH", 0x8100, 100),
                "qinq": struct.pack("!HHHH", 0x88A8, 10, 0x8100, 20)}[link]
        return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + tags + struct.pack("!H", etype) + ip
    if link == "sll":
        return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01\0\0", etype) + ip
    if link == "sll2":
        return struct.pack("!HHIHBB8s", etype, 0, 1, 1, 0, 6, b"\x02\0\0\0\0\x01\0\0") + ip
    if link == "null":
        return struct.pack("=I", 2 if etype == 0x0800 else 30) + ip
    return ip  # raw, ipv4, ipv6


@dataclass(frozen=True)
class Seg:
    """One segment of a conversation: `direction` 0 is client to server, 1 back."""

    direction: int
    seq: int
    ack: int
    flags: int
    payload: bytes = b""


@dataclass
class Flow:
    client: str = "10.0.0.1"
    client_port: int = 40000
    server: str = "10.0.0.2"
    server_port: int = 80
    client_isn: int = 1000
    server_isn: int = 5000

    def conversation(self, exchanges: list[tuple[int, bytes]], mss: int = 1460,
                     handshake: bool = True, close: Literal["fin", "rst", None] = "fin") -> list[Seg]:
        """Segments of a conversation: handshake, each (direction, bytes) split at `mss`, close."""
        nxt = [self.client_isn & 0xFFFFFFFF, self.server_isn & 0xFFFFFFFF]
        segs: list[Seg] = []
        if handshake:
            segs.append(Seg(0, nxt[0], 0, SYN))
            segs.append(Seg(1, nxt[1], nxt[0] + 1, SYN | ACK))
            nxt = [(nxt[0] + 1) & 0xFFFFFFFF, (nxt[1] + 1) & 0xFFFFFFFF]
            segs.append(Seg(0, nxt[0], nxt[1], ACK))
        for d, data in exchanges:
            for i in range(0, len(data), mss):
                chunk = data[i:i + mss]
                segs.append(Seg(d, nxt[d], nxt[1 - d], ACK | PSH, chunk))
                nxt[d] = (nxt[d] + len(chunk)) & 0xFFFFFFFF
        if close == "fin":
            segs.append(Seg(0, nxt[0], nxt[1], FIN | ACK))
            segs.append(Seg(1, nxt[1], nxt[0] + 1, FIN | ACK))
            segs.append(Seg(0, nxt[0] + 1, nxt[1] + 1, ACK))
        elif close == "rst":
            segs.append(Seg(0, nxt[0], nxt[1], RST | ACK))
        return segs

    def frame(self, seg: Seg, link: str = "eth") -> bytes:
        """`seg` as a captured frame of the given link layer."""
        c, s = ipaddress.ip_address(self.client).packed, ipaddress.ip_address(self.server).packed
        src, dst, sport, dport = (c, s, self.client_port, self.server_port) if seg.direction == 0 else \
            (s, c, self.server_port, self.client_port)
        tcp = tcp_header(sport, dport, seg.seq, seg.ack, seg.flags) + seg.payload
        ip = ipv4_packet(src, dst, tcp) if len(src) == 4 else ipv6_packet(src, dst, tcp)
        return link_frame(link, ip)


def write_pcap(path: str, packets: list[tuple[int, bytes]], linktype: int = 1, nanos: bool = False,
               order: str = "<", snaplen: int = 262144) -> None:
    """`packets`: (timestamp ns, frame)."""
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    with open(path, "wb") as f:
        f.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        rec = struct.Struct(order + "IIII")
        for ts, frame in packets:
            sec, ns = divmod(ts, 1_000_000_000)
            f.write(rec.pack(sec, ns if nanos else ns // 1000, len(frame), len(frame)))
            f.write(frame)


def _block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def write_pcapng(path: str, interfaces: list[tuple[int, int | None]],
                 packets: list[tuple[int, int, bytes]], order: str = "<", simple: bool = False) -> None:
    """`interfaces`: (link type, if_tsresol byte or None for µs); `packets`: (interface, ts ns, frame).

    With `simple`, packets go into simple packet blocks (interface 0, no timestamp).
    """
    out = [_block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
                  + _option(order, 4, b"meshlens tests") + _option(order, 0, b""))]
    units: list[tuple[int, int]] = []
    for linktype, tsresol in interfaces:
        opts = b""
        num, den = 1, 1000  # units per ns, as a fraction
        if tsresol is not None:
            opts += _option(order, 9, bytes([tsresol]))
            if tsresol & 0x80:
                num, den = 1 << (tsresol & 0x7F), 1_000_000_000
            else:
                num, den = 10 ** tsresol, 1_000_000_000
        out.append(_block(order, 1, struct.pack(order + "HHI", linktype, 0, 0) + opts + _option(order, 0, b"")))
        units.append((num, den))
    for iface, ts, frame in packets:
        if simple:
            out.append(_block(order, 3, struct.pack(order + "I", len(frame)) + frame))
            continue
        num, den = units[iface]
        t = ts * num // den
        out.append(_block(order, 6, struct.pack(order + "IIIII", iface, t >> 32, t & 0xFFFFFFFF,
                                                len(frame), len(frame)) + frame))
    with open(path, "wb") as f:
        f.write(b"".join(out))

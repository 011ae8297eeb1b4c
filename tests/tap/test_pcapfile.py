"""tap/pcapfile.py: pcap and pcapng of every flavour; damage is one line after the good packets."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from meshlens.tap.packets import PacketDecoder
from meshlens.tap.pcapfile import PcapError, PcapReader, read_packets
from tests.tap.pcapgen import LINKTYPE_OF, Flow, _block, write_pcap, write_pcapng

T0 = 1_700_000_000_123_456_789
FLOW = Flow()
SEGS = FLOW.conversation([(0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), (1, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 3000)])
FRAMES = [FLOW.frame(s) for s in SEGS]
TIMES = [T0 + i * 1_000_001 for i in range(len(FRAMES))]


def _read(path: Path) -> list[tuple[int, int, bytes]]:
    return [(ts, lt, bytes(f)) for ts, lt, f in read_packets(path)]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nanos", [False, True])
def test_pcap_both_byte_orders_and_precisions(tmp_path: Path, order: str, nanos: bool) -> None:
    path = tmp_path / "a.pcap"
    write_pcap(str(path), list(zip(TIMES, FRAMES)), nanos=nanos, order=order)
    got = _read(path)
    want_ts = TIMES if nanos else [t // 1000 * 1000 for t in TIMES]
    assert got == [(t, 1, f) for t, f in zip(want_ts, FRAMES)]


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_from_a_stream_and_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    from meshlens.tap import pcapfile
    monkeypatch.setattr(pcapfile, "READ_CHUNK", 7)  # every record straddles a chunk boundary
    path = tmp_path / f"a.{kind}"
    if kind == "pcap":
        write_pcap(str(path), list(zip(TIMES, FRAMES)), nanos=True)
    else:
        write_pcapng(str(path), [(1, 9)], [(0, t, f) for t, f in zip(TIMES, FRAMES)])
    stream = io.BytesIO(path.read_bytes())
    reader = PcapReader(stream)
    assert [(ts, bytes(f)) for ts, _, f in reader] == list(zip(TIMES, FRAMES))
    assert reader.packets == len(FRAMES) and reader.offset == len(path.read_bytes())


def test_pcapng_unknown_blocks_and_a_second_section_are_read_through(tmp_path: Path) -> None:
    first, second = tmp_path / "1.pcapng", tmp_path / "2.pcapng"
    write_pcapng(str(first), [(1, 9)], [(0, t, f) for t, f in zip(TIMES[:3], FRAMES[:3])])
    write_pcapng(str(second), [(101, None), (1, 9)], [(1, t, f) for t, f in zip(TIMES[3:], FRAMES[3:])], order=">")
    stats_block = _block("<", 5, b"\0" * 20)  # an interface statistics block, skipped
    path = tmp_path / "both.pcapng"
    path.write_bytes(first.read_bytes() + stats_block + second.read_bytes())
    assert [(ts, lt, f) for ts, lt, f in _read(path)] == [(t, 1, f) for t, f in zip(TIMES, FRAMES)]


def test_pcap_link_types(tmp_path: Path) -> None:
    for link in ("sll", "sll2", "raw"):
        path = tmp_path / f"{link}.pcap"
        write_pcap(str(path), [(T0, FLOW.frame(s, link)) for s in SEGS], linktype=LINKTYPE_OF[link])
        dec = PacketDecoder()
        segs = [dec.decode(lt, f) for _, lt, f in read_packets(path)]
        assert [s.seq for s in segs] == [s.seq for s in SEGS], link


def test_pcapng_two_interfaces_link_types_and_resolutions(tmp_path: Path) -> None:
    # Interface 0: Ethernet, nanoseconds; interface 1: SLL2, default microseconds; 2: raw IP, 2^-20 s.
    path = tmp_path / "a.pcapng"
    links = ["eth", "sll2", "raw"]
    packets = [(i % 3, t, FLOW.frame(s, links[i % 3])) for i, (t, s) in enumerate(zip(TIMES, SEGS))]
    write_pcapng(str(path), [(1, 9), (276, None), (101, 0x80 | 20)], packets)
    got = _read(path)
    assert [lt for _, lt, _ in got] == [LINKTYPE_OF[links[i % 3]] for i in range(len(SEGS))]
    assert [f for _, _, f in got] == [f for _, _, f in packets]
    for (iface, t, _), (ts, _, _) in zip(packets, got):
        if iface == 0:
            assert ts == t
        elif iface == 1:
            assert ts == t // 1000 * 1000
        else:
            assert abs(ts - t) < 1000  # 2^-20 s is ~954 ns
    dec = PacketDecoder()
    assert [dec.decode(lt, f).seq for _, lt, f in got] == [s.seq for s in SEGS]


def test_pcapng_big_endian_and_simple_packet_blocks(tmp_path: Path) -> None:
    path = tmp_path / "be.pcapng"
    write_pcapng(str(path), [(1, None)], [(0, T0, f) for f in FRAMES], order=">")
    assert [f for _, _, f in _read(path)] == FRAMES
    write_pcapng(str(path), [(1, None)], [(0, T0, f) for f in FRAMES], simple=True)
    assert [(lt, f) for _, lt, f in _read(path)] == [(1, f) for f in FRAMES]


def _damaged(tmp_path: Path, kind: str, cut: int) -> Path:
    path = tmp_path / f"a.{kind}"
    if kind == "pcap":
        write_pcap(str(path), list(zip(TIMES, FRAMES)))
    else:
        write_pcapng(str(path), [(1, 9)], [(0, t, f) for t, f in zip(TIMES, FRAMES)])
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data)
    return path


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_truncated_file_keeps_every_packet_before_the_cut(tmp_path: Path, kind: str) -> None:
    full = _damaged(tmp_path, kind, 0).read_bytes()
    # Cut in the middle of the 4th packet's data, then in the middle of its header.
    for cut_back in (10, len(FRAMES[3]) + 10):
        offset = len(full) - sum(len(f) + (16 if kind == "pcap" else 32) for f in FRAMES[3:]) - 1
        path = _damaged(tmp_path, kind, offset + cut_back)
        got: list[bytes] = []
        with pytest.raises(PcapError, match=r"truncated .* after 3 packets") as err:
            for _, _, f in read_packets(path):
                got.append(bytes(f))
        assert got == FRAMES[:3]
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_corrupt_record_header_keeps_the_packets_before(tmp_path: Path) -> None:
    path = _damaged(tmp_path, "pcap", 0)
    data = bytearray(path.read_bytes())
    third = 24 + sum(16 + len(f) for f in FRAMES[:2])
    data[third + 8:third + 12] = (0x7FFFFFFF).to_bytes(4, "little")  # captured length
    path.write_bytes(bytes(data))
    got = []
    with pytest.raises(PcapError, match="corrupt record header"):
        got.extend(bytes(f) for _, _, f in read_packets(path))
    assert got == FRAMES[:2]


def test_corrupt_pcapng_block_keeps_the_packets_before(tmp_path: Path) -> None:
    path = _damaged(tmp_path, "pcapng", 0)
    data = bytearray(path.read_bytes())
    # The SHB, the IDB, then EPBs: break the trailing length of the 3rd EPB.
    pos = 0
    for _ in range(2 + 3):
        pos += int.from_bytes(data[pos + 4:pos + 8], "little")
    data[pos - 4:pos] = b"\x01\0\0\0"
    path.write_bytes(bytes(data))
    got = []
    with pytest.raises(PcapError, match="trailing length"):
        got.extend(bytes(f) for _, _, f in read_packets(path))
    assert got == FRAMES[:2]


@pytest.mark.parametrize("content, message", [
    (None, "cannot open"), (b"", "truncated file header"), (b"GIF89a\0\0", "not a pcap"),
    (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated file header"),
])
def test_bad_files_are_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pcap"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PcapError, match=message) as err:
        list(read_packets(path))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (Debian: tshark)")
@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_agrees_with_tshark(tmp_path: Path, kind: str) -> None:
    flows = [Flow(client_port=40000 + i, client_isn=0xFFFFFF00 * (i % 2) + i * 7919, server_isn=i * 104729)
             for i in range(20)]
    frames = [f.frame(s, "vlan" if i % 3 == 0 else "eth") for i, f in enumerate(flows)
              for s in f.conversation([(0, b"a" * 3000), (1, b"b" * 5000)])]
    path = tmp_path / f"x.{kind}"
    if kind == "pcap":
        write_pcap(str(path), [(T0 + i, fr) for i, fr in enumerate(frames)], nanos=True)
    else:
        write_pcapng(str(path), [(1, 9)], [(0, T0 + i, fr) for i, fr in enumerate(frames)])
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number", "-e", "tcp.seq_raw"],
                         capture_output=True, text=True, check=True).stdout
    theirs = [tuple(map(int, line.split("\t"))) for line in out.splitlines()]
    dec = PacketDecoder()
    ours = [(i + 1, dec.decode(lt, f).seq) for i, (_, lt, f) in enumerate(read_packets(path))]
    assert len(ours) == len(frames) and ours == theirs

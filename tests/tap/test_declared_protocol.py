"""mesh.yaml's `protocol` replaces the tap's sniffing for connections to the service's instances.

Transcripts through a real `Tap` (tests/tap/test_calls.py's helpers), and one pcap through the
`meshlens tap` command: a declared `tcp` is never parsed as HTTP, `tls` is read for its hellos
whatever the first bytes, `http` is parsed as HTTP/1.1 where sniffing would have said tcp.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from meshlens.mesh import parse as parse_mesh
from meshlens.tap.calls import Tap
from tests.tap.pcapgen import LINKTYPE_OF, Flow, write_pcap
from tests.tap.test_calls import T0, STEP, capture, conv, http, req, resp, tls_transcript  # noqa: F401 (fixture)

SERVER = "10.0.0.2"


def mesh(protocol: str | None, port: int = 80):  # type: ignore[no-untyped-def]
    body = {"instances": [f"{SERVER}:{port}"], **({"protocol": protocol} if protocol else {})}
    return parse_mesh({"services": {"api": body}})


def test_declared_tcp_is_never_parsed_as_http() -> None:
    items = conv(Flow(), [(0, req(path="/a")), (1, resp(body=b"hello"))])
    sniffed, declared = capture(items, mesh=mesh(None)), capture(items, mesh=mesh("tcp"))
    assert [(c.protocol, c.path, c.status) for c in sniffed] == [("http/1.1", "/a", 200)]
    assert [(c.protocol, c.method, c.path, c.status, c.dst_service) for c in declared] == [("tcp", "", "", 0, "api")]
    assert (declared[0].request_bytes, declared[0].response_bytes) == (len(req(path="/a")), len(resp(body=b"hello")))


def test_a_declared_protocol_applies_to_the_services_addresses_only() -> None:
    ours = conv(Flow(client_port=40001), [(0, req(path="/ours")), (1, resp())])
    other = conv(Flow(client_port=40002, server="10.0.0.3"), [(0, req(path="/other")), (1, resp())])
    calls = capture(ours + other, mesh=mesh("tcp"))
    assert sorted((c.src_port, c.protocol, c.path) for c in calls) == [(40001, "tcp", ""), (40002, "http/1.1", "/other")]


def test_declared_http_parses_what_sniffing_calls_tcp() -> None:
    """An empty line before the request line (RFC 9112 2.2 says to ignore it) is tcp sniffed, a request declared."""
    items = conv(Flow(), [(0, b"\r\n" + req(path="/pot")), (1, resp(418, b""))])
    assert [c.protocol for c in capture(items)] == ["tcp"]
    assert [(c.protocol, *http(c)) for c in capture(items, mesh=mesh("http"))] == [
        ("http/1.1", "GET", "api", "/pot", 418, 0, 0, "")]


def test_declared_http_counts_what_is_not_http_as_a_protocol_error() -> None:
    calls: list = []
    tap = Tap(calls.append, mesh=mesh("http"))
    flow = Flow()
    for i, seg in enumerate(flow.conversation([(0, b"\x00\x01 not http at all\r\n\r\n"), (1, b"\x02")])):
        tap.feed(T0 + i * STEP, LINKTYPE_OF["eth"], flow.frame(seg))
    tap.finish()
    assert tap.stats.protocol_errors >= 1
    assert all(c.protocol == "http/1.1" for c in calls)


def test_declared_tls_records_the_hellos(tls_transcript: list[tuple[int, bytes]]) -> None:  # noqa: F811
    (call,) = capture(conv(Flow(), tls_transcript), mesh=mesh("tls"))
    assert (call.protocol, call.tls, call.authority, call.dst_service) == ("tls", True, "api.example", "api")
    assert call.attributes["tls_version"] == "TLSv1.3"


def test_declared_tls_that_is_not_tls_is_one_tls_call_with_the_parse_error() -> None:
    (call,) = capture(conv(Flow(), [(0, req()), (1, resp())]), mesh=mesh("tls"))
    assert (call.protocol, call.tls, call.method, call.authority) == ("tls", True, "", "")
    assert call.attributes["tls_parse_error"]


def test_declared_tls_seen_midstream_is_tls_without_hellos() -> None:
    (call,) = capture(conv(Flow(), [(0, b"\x17\x03\x03\x00\x02ab"), (1, b"\x17\x03\x03\x00\x01c")], handshake=False),
                      mesh=mesh("tls"))
    assert (call.protocol, call.tls, call.attributes.get("midstream")) == ("tls", True, "true")
    assert "tls_parse_error" not in call.attributes


def test_the_tap_command_honours_the_declared_protocol(tmp_path: Path) -> None:
    flow = Flow()
    segs = flow.conversation([(0, req(path="/a")), (1, resp())])
    pcap = tmp_path / "c.pcap"
    write_pcap(str(pcap), [(T0 + i * STEP, flow.frame(s)) for i, s in enumerate(segs)])
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(f"services:\n  api:\n    protocol: tcp\n    instances: ['{SERVER}:80']\n")
    out = tmp_path / "calls.csv"
    p = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "tap", "--pcap", str(pcap), "--mesh",
                        str(mesh_file), "--out", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(out.open()))
    assert [(r["protocol"], r["method"], r["dst_service"]) for r in rows] == [("tcp", "", "api")]

"""Reassembled connections in, call records out: the tap's upper half.

Per connection the first client bytes are sniffed (`meshlens.protocols.sniff`):

- `http/1.1`: both streams drive an `Http1Tracker`; each `Exchange` is one call.
- `tls`: a `HelloParser` per direction reads SNI, versions and ALPN; the
  connection is one call of protocol `tls` with its bytes and lifetime.
- `h2` (the cleartext preface): an `H2Tracker` follows it; each stream is one call, `grpc`
  (route `/package.Service/Method`) when its content-type is application/grpc*, else `h2`. A
  connection the tracker gives up on (HPACK undecodable: a capture begun mid-connection, a
  gap, malformed frames, a limit passed) is one `h2` call with `h2.undecoded` saying why.
- anything else, a server that speaks first, or bytes lost before the protocol
  was known: one `tcp` call with its bytes each way and its lifetime.

A protocol the mesh declares for the server's address (mesh.yaml `protocol`) replaces
sniffing: the connection is that protocol from its first byte (`tcp` is never parsed).

`Tap` is the whole pipeline, frames to calls: `PacketDecoder` -> `Reassembler`
-> `CallBuilder`. No I/O and no clock: the caller passes capture time, and
calls go to a sink (a list's `append`, `CallRecorder.record`, a file writer).
Memory is bounded per connection (the reassembler's buffers, the protocol
cores' limits, `MAX_SNIFF_HOLD` here) and idle connections expire.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address

from meshlens.collector.record import Call
from meshlens.mesh import RECORDED_PROTOCOL, Mesh
from meshlens.protocols.errors import PeerError
from meshlens.protocols.exchange import Exchange, TunnelClosed
from meshlens.protocols.h2_tracker import H2Exchange, H2Tracker, looks_like_h2
from meshlens.protocols.h2_tracker import State as H2State
from meshlens.protocols.http1_tracker import Http1Tracker, State
from meshlens.protocols.trace_context import parse_traceparent as _traceparent_fields
from meshlens.protocols.sniff import SNIFF_MAX_BYTES, sniff
from meshlens.protocols.tls import ClientHello, HelloParser, ServerHello, hello_attributes
from meshlens.tap.packets import PacketDecoder
from meshlens.tap.reassembly import Close, Conn, Data, Gap, Open, Reassembler

__all__ = ["MAX_NAME_CACHE", "MAX_SNIFF_HOLD", "CallBuilder", "Tap", "TapStats", "parse_traceparent", "shard_of"]

# Server bytes held while the client has not yet sent enough to sniff: a
# response cannot be larger than the request window before the request is
# known, and 64 KiB is Linux's default initial receive window.
MAX_SNIFF_HOLD = 64 * 1024
# Addresses whose mesh names are cached; the cache is cleared past this (a scan
# of many addresses must not grow memory without bound).
MAX_NAME_CACHE = 65_536
# For a connection seen without its SYN, this many bytes of each direction are
# searched for an HTTP/1 start line before it is called plain tcp.
MIDSTREAM_PROBE_BYTES = 8 * 1024

_HTTP1_MARK = re.compile(rb"HTTP/1\.[01](?:\r\n| [1-5][0-9]{2})")

Sink = Callable[[Call], None]


def parse_traceparent(value: str | None) -> tuple[str, str]:
    """(trace id, span id) of a valid `traceparent` header, else ('', '')."""
    fields = _traceparent_fields(value)
    return ("", "") if fields is None else (fields[0], fields[1])


@dataclass(slots=True)
class TapStats:
    """What the pipeline produced; the decoder and reassembler keep their own counters."""

    packets: int = 0
    connections: int = 0
    calls: int = 0
    incomplete_calls: int = 0
    protocol_errors: int = 0
    """Malformed HTTP/1, TLS or HTTP/2 bytes (the parser resynchronised, or gave up on the hello or the connection)."""


class _Flow:
    """One connection's protocol state, from Open to Close."""

    __slots__ = ("conn", "start", "last", "midstream", "proto", "head", "held", "held_bytes",
                 "tracker", "hellos", "client_hello", "server_hello", "tls_error",
                 "c2s_bytes", "s2c_bytes", "gap", "probe")

    def __init__(self, conn: Conn, t: int, midstream: bool) -> None:
        self.conn = conn
        self.start = t
        self.last = t
        self.midstream = midstream
        self.proto = ""  # '' while sniffing
        self.head = b""  # first client bytes, while sniffing
        self.held: list[tuple[str, bytes, int]] = []  # (direction, bytes, t) seen while sniffing
        self.held_bytes = 0
        self.tracker: Http1Tracker | H2Tracker | None = None
        self.hellos: list[HelloParser | None] = [None, None]
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.tls_error = ""
        self.c2s_bytes = 0
        self.s2c_bytes = 0
        self.gap = False
        self.probe = b""  # midstream: both directions' first bytes, searched for HTTP/1


class CallBuilder:
    """Reassembly events in, `Call`s out to `sink`."""

    def __init__(self, sink: Sink, *, mesh: Mesh | None = None, observer_id: str = "tap") -> None:
        self.sink = sink
        self.mesh = mesh
        self.observer_id = observer_id
        self.stats = TapStats()
        self._flows: dict[Conn, _Flow] = {}
        # (packed IP, port) -> (address text, service, subset, declared protocol as records name it)
        self._names: dict[tuple[bytes, int], tuple[str, str, str, str | None]] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def handle(self, events: list) -> None:
        for ev in events:
            cls = type(ev)
            if cls is Data:
                f = self._flows.get(ev.conn)
                if f is not None:
                    self._data(f, ev.direction, ev.data, ev.t)
            elif cls is Open:
                f = self._flows[ev.conn] = _Flow(ev.conn, ev.t, ev.midstream)
                self.stats.connections += 1
                declared = self._names_of(ev.conn.server, ev.conn.server_port)[3]
                if declared is not None:
                    self._decide(f, declared)
            elif cls is Gap:
                f = self._flows.get(ev.conn)
                if f is not None:
                    self._gap(f, ev.direction, ev.nbytes, ev.t)
            elif cls is Close:
                f = self._flows.pop(ev.conn, None)
                if f is not None:
                    self._close(f, ev.reason, ev.t)

    # -- per connection ------------------------------------------------------

    def _data(self, f: _Flow, direction: str, data: bytes, t: int) -> None:
        f.last = t
        if direction == "c2s":
            f.c2s_bytes += len(data)
        else:
            f.s2c_bytes += len(data)
        proto = f.proto
        if proto == "http/1.1":
            tr = f.tracker
            if tr.state is State.CLOSED:
                return
            try:
                events = tr.feed_request(data, t) if direction == "c2s" else tr.feed_response(data, t)
            except PeerError as e:
                self.stats.protocol_errors += 1
                events = e.events
            if events:
                self._http_events(f, events)
        elif proto == "h2":
            tr = f.tracker
            if tr.state is not H2State.CLOSED:
                events = tr.feed_request(data, t) if direction == "c2s" else tr.feed_response(data, t)
                for ex in events:
                    self._h2_call(f, ex)
        elif proto == "tls":
            self._tls(f, direction, data)
        elif not proto:
            self._sniff(f, direction, data, t)

    def _sniff(self, f: _Flow, direction: str, data: bytes, t: int) -> None:
        f.held.append((direction, data, t))
        f.held_bytes += len(data)
        if f.midstream:
            f.probe += data[:MIDSTREAM_PROBE_BYTES]
            if _HTTP1_MARK.search(f.probe):
                self._decide(f, "http/1.1")
            elif looks_like_h2(data):  # whole frames: h2, whose HPACK state began before the capture
                self._decide(f, "h2")
            elif len(f.probe) >= 2 * MIDSTREAM_PROBE_BYTES or f.held_bytes > MAX_SNIFF_HOLD:
                self._decide(f, "tcp")
            return
        if direction == "s2c":
            if not f.head and not looks_like_h2(b"".join(d for dr, d, _ in f.held if dr == "s2c")):
                self._decide(f, "tcp")  # the server spoke first: not HTTP or TLS, nor an h2 server's SETTINGS
            elif f.held_bytes > MAX_SNIFF_HOLD:
                self._decide(f, "tcp")
            return
        f.head += data[:SNIFF_MAX_BYTES]
        proto = sniff(f.head)
        if proto != "need_more":
            self._decide(f, proto)
        elif f.held_bytes > MAX_SNIFF_HOLD:
            self._decide(f, "tcp")

    def _decide(self, f: _Flow, proto: str) -> None:
        """The protocol is known: replay what was held into its parser."""
        f.proto = proto
        held, f.held, f.head, f.probe = f.held, [], b"", b""
        f.held_bytes = 0
        if proto == "http/1.1":
            f.tracker = Http1Tracker(midstream=f.midstream)
        elif proto == "h2":
            f.tracker = H2Tracker(midstream=f.midstream)
        elif proto == "tls" and not f.midstream:  # (declared tls) seen midstream, its hellos are gone
            f.hellos = [HelloParser("client"), HelloParser("server")]
        else:
            return
        # counted once already, in _data: replay only into the parser
        f.c2s_bytes -= sum(len(d) for dr, d, _ in held if dr == "c2s")
        f.s2c_bytes -= sum(len(d) for dr, d, _ in held if dr == "s2c")
        for direction, data, t in held:
            self._data(f, direction, data, t)

    def _tls(self, f: _Flow, direction: str, data: bytes) -> None:
        i = 0 if direction == "c2s" else 1
        parser = f.hellos[i]
        if parser is None:
            return
        try:
            hello = parser.feed(data)
        except PeerError as e:
            self.stats.protocol_errors += 1
            f.tls_error = f.tls_error or str(e)
            f.hellos[i] = None
            return
        if hello is not None:
            f.hellos[i] = None
            if isinstance(hello, ClientHello):
                f.client_hello = hello
            else:
                f.server_hello = hello
                if hello.hello_retry:  # another ServerHello follows the client's second hello
                    f.hellos[1] = HelloParser("server")

    def _gap(self, f: _Flow, direction: str, nbytes: int, t: int) -> None:
        f.gap = True
        f.last = t
        if direction == "c2s":
            f.c2s_bytes += nbytes
        else:
            f.s2c_bytes += nbytes
        if not f.proto:
            self._decide(f, "tcp")  # the protocol's first bytes are gone
        if f.proto == "http/1.1" and f.tracker.state is not State.CLOSED:
            events = f.tracker.gap("request" if direction == "c2s" else "response", nbytes, t)
            if events:
                self._http_events(f, events)
        elif f.proto == "h2":
            for ex in f.tracker.gap("request" if direction == "c2s" else "response", nbytes, t):
                self._h2_call(f, ex)
        elif f.proto == "tls":
            f.hellos = [None, None]  # a hello cut by a gap cannot be parsed

    def _close(self, f: _Flow, reason: str, t: int) -> None:
        end = f.last if reason in ("idle", "eof") else t
        if not f.proto:
            self._decide(f, "tcp")  # too few bytes to tell (or none: a handshake is still a connection)
        if f.proto == "http/1.1":
            tr = f.tracker
            if tr.state is not State.CLOSED:
                if reason == "fin":
                    events = tr.feed_request_eof(t) + tr.feed_response_eof(t)
                else:
                    events = tr.close(end, "reset" if reason == "rst" else "closed")
                if events:
                    self._http_events(f, events)
            return
        if f.proto == "h2":
            tr = f.tracker
            for ex in tr.close(end, {"rst": "reset", "fin": "truncated"}.get(reason, "closed")):
                self._h2_call(f, ex)
            if tr.opened and not tr.undecoded:
                return  # every stream was a call; a connection without any is one call, its bytes not lost
            if tr.peer_error:
                self.stats.protocol_errors += 1
        self._connection_call(f, reason, end)

    # -- calls ---------------------------------------------------------------

    def _names_of(self, ip: bytes, port: int) -> tuple[str, str, str, str | None]:
        """What the mesh says of an address, cached: its text, service, subset and declared protocol."""
        key = (ip, port)
        found = self._names.get(key)
        if found is None:
            if len(self._names) >= MAX_NAME_CACHE:
                self._names.clear()
            text = str(ip_address(ip))
            declared: str | None = None
            if self.mesh is not None:
                service, subset = self.mesh.name_of(text, port)
                protocol = self.mesh.declared_protocol(text, port)
                declared = RECORDED_PROTOCOL.get(protocol) if protocol is not None else None
            else:
                service, subset = (f"[{text}]:{port}" if ":" in text else f"{text}:{port}"), ""
            found = self._names[key] = (text, service, subset, declared)
        return found

    def _base(self, f: _Flow, protocol: str, time: int, duration: int) -> Call:
        c = f.conn
        src_addr, src_service, _, _ = self._names_of(c.client, c.client_port)
        dst_addr, dst_service, dst_subset, _ = self._names_of(c.server, c.server_port)
        return Call(time=time, duration_ns=duration, observer="wire", observer_id=self.observer_id,
                    src_service=src_service, src_addr=src_addr, src_port=c.client_port,
                    dst_service=dst_service, dst_subset=dst_subset, dst_addr=dst_addr, dst_port=c.server_port,
                    protocol=protocol)

    def _emit(self, call: Call) -> None:
        self.stats.calls += 1
        if call.error == "incomplete":
            self.stats.incomplete_calls += 1
        self.sink(call)

    def _http_events(self, f: _Flow, events: list) -> None:
        for ev in events:
            if type(ev) is Exchange:
                self._exchange_call(f, ev)
            elif type(ev) is TunnelClosed:
                call = self._base(f, "tcp", ev.start_ns, max(0, ev.end_ns - ev.start_ns))
                call.request_bytes, call.response_bytes = ev.request_bytes, ev.response_bytes
                call.attributes["tunnel"] = "upgrade"
                if f.gap:
                    call.error = "incomplete"
                self._emit(call)

    def _exchange_call(self, f: _Flow, ex: Exchange) -> None:
        start = ex.request_start_ns or ex.response_start_ns or ex.response_end_ns
        call = self._base(f, "http/1.1", start, max(0, ex.response_end_ns - start))
        call.method, call.authority, call.path, call.status = ex.method, ex.authority, ex.path, ex.status
        call.request_bytes, call.response_bytes = ex.request_body_bytes, ex.response_body_bytes
        call.trace_id, call.span_id = parse_traceparent(ex.traceparent)
        attrs = call.attributes
        if ex.response_start_ns and start:
            attrs["ttfb_ns"] = str(max(0, ex.response_start_ns - start))
        if ex.x_request_id:
            attrs["x_request_id"] = ex.x_request_id
        if ex.upgraded:
            attrs["upgraded"] = "true"
        if f.midstream:
            attrs["midstream"] = "true"
        if ex.incomplete:
            attrs["incomplete"] = ex.error or "true"
            call.error = {"protocol_error": "protocol_error", "reset": "reset"}.get(ex.error, "incomplete")
        self._emit(call)

    def _h2_call(self, f: _Flow, ex: H2Exchange) -> None:
        start = ex.request_start_ns or ex.response_end_ns
        call = self._base(f, "grpc" if ex.grpc else "h2", start, max(0, ex.response_end_ns - start))
        call.authority, call.path, call.status = ex.authority, ex.path, ex.status
        # gRPC: the method path is the method and the route, as the record and OTLP spans name it
        call.method = ex.path if ex.grpc else ex.method
        if ex.grpc:
            call.route = ex.path
            call.grpc_status = ex.grpc_status
        call.request_bytes, call.response_bytes = ex.request_body_bytes, ex.response_body_bytes
        call.trace_id, call.span_id = parse_traceparent(ex.traceparent)
        attrs = call.attributes
        attrs["h2.stream_id"] = str(ex.stream_id)
        if ex.grpc_message:
            attrs["grpc.message"] = ex.grpc_message
        if ex.response_start_ns and start:
            attrs["ttfb_ns"] = str(max(0, ex.response_start_ns - start))
        if ex.x_request_id:
            attrs["x_request_id"] = ex.x_request_id
        if ex.reset_code:
            attrs["h2.reset"] = ex.reset_code
        if ex.reset_by:  # Envoy's DR (downstream remote reset) and UR (upstream remote reset)
            attrs["h2.reset_by"] = ex.reset_by
            call.response_flags = "DR" if ex.reset_by == "client" else "UR"
        if ex.incomplete:
            attrs["incomplete"] = ex.error or "true"
            call.error = {"protocol_error": "protocol_error", "reset": "reset", "goaway": "refused"}.get(
                ex.error, "incomplete")
        self._emit(call)

    def _connection_call(self, f: _Flow, reason: str, end: int) -> None:
        call = self._base(f, f.proto, f.start, max(0, end - f.start))
        call.request_bytes, call.response_bytes = f.c2s_bytes, f.s2c_bytes
        attrs = call.attributes
        attrs["close"] = reason
        if f.midstream:
            attrs["midstream"] = "true"
        if f.proto == "h2":
            if f.tracker.undecoded:
                attrs["h2.undecoded"] = f.tracker.undecoded
        elif f.proto == "tls":
            call.tls = True
            if f.client_hello is not None:
                call.authority = f.client_hello.sni or ""
            attrs.update(hello_attributes(f.client_hello, f.server_hello, f.tls_error))
        if f.gap:
            call.error = "incomplete"
        elif reason == "rst":
            call.error = "reset"
        self._emit(call)


def shard_of(sport: int, dport: int, shards: int) -> int:
    """Which of `shards` tap processes takes a connection: the same for both directions."""
    return (((sport + dport) * 0x9E3779B1) >> 16) % shards


class Tap:
    """The whole pipeline: captured frames in (any supported link type), calls out to `sink`."""

    def __init__(self, sink: Sink, *, mesh: Mesh | None = None, observer_id: str = "tap",
                 shard: tuple[int, int] = (0, 1)) -> None:
        """`shard` (i, n): keep only connections whose port sum, mixed, is i mod n, so that n
        processes reading the same file share its connections (both directions of a
        connection have the same port sum). Mixed (Fibonacci hashing) because Linux gives
        connect() ephemeral ports of one parity (since 4.6): the bare sum mod 2 put every
        connection to one server port in one shard (bench/tap_h2.py)."""
        self.decoder = PacketDecoder()
        # Captures are taken on the path, so an ACK past a hole means the capture lost
        # those bytes: report the gap before the answer to them is parsed.
        self.reassembler = Reassembler(ack_gaps=True)
        self.calls = CallBuilder(sink, mesh=mesh, observer_id=observer_id)
        self.stats = self.calls.stats
        self.last_t = 0
        self.shard_index, self.shards = shard

    def feed(self, t_ns: int, linktype: int, frame: bytes | memoryview) -> None:
        """One captured frame, at capture time `t_ns`."""
        self.stats.packets += 1
        self.last_t = t_ns
        seg = self.decoder.decode(linktype, frame)
        if seg is not None:
            if self.shards > 1 and shard_of(seg.sport, seg.dport, self.shards) != self.shard_index:
                return
            events = self.reassembler.feed(seg, t_ns)
            if events:
                self.calls.handle(events)

    def expire(self, now_ns: int) -> None:
        """Close idle connections (a live capture calls this when no packet comes)."""
        self.calls.handle(self.reassembler.expire(now_ns))

    def finish(self, t_ns: int | None = None) -> None:
        """End of capture: every open connection is closed and its calls emitted."""
        self.calls.handle(self.reassembler.close_all(self.last_t if t_ns is None else t_ns))

    def summary(self) -> dict[str, int]:
        r, d = self.reassembler.stats, self.decoder.stats
        return {"packets": self.stats.packets, "tcp_segments": d.tcp, "connections": r.connections,
                "calls": self.stats.calls, "incomplete_calls": self.stats.incomplete_calls,
                "gaps": r.gaps, "gap_bytes": r.gap_bytes, "duplicate_bytes": r.duplicate_bytes,
                "protocol_errors": self.stats.protocol_errors,
                "skipped_frames": d.not_tcp + d.fragments + d.truncated + d.malformed + d.unknown_linktype}

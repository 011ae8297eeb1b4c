"""µs per exchange for a small keep-alive GET through the HTTP/1.1 codec, against bare httptools.

Run: .venv/bin/python bench/http1.py
Reference in the same run: the same bytes through two httptools parsers with empty
callbacks (the floor any httptools-based codec pays). Measured: the two readers as the
proxy drives them (heads and ends to a consumer), and the tap's tracker over them
(an `Exchange` record per exchange). Goal: readers <= 2x the bare parsers. Reported, not asserted.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlens.protocols.http1 import RequestReader, ResponseReader
from meshlens.protocols.http1_tracker import Http1Tracker

REQUEST = (
    b"GET /api/v1/orders?id=42 HTTP/1.1\r\nHost: orders.shop.svc:8080\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"x-request-id: 6f1c2d3e-1111-2222-3333-444455556666\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class NoCallbacks:
    """httptools' callbacks, empty: the floor any httptools-based codec pays (bench/hot_path.py too)."""

    def on_message_begin(self) -> None: ...
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_message_complete(self) -> None: ...


def bare(n: int) -> float:
    cb = NoCallbacks()
    req, resp = httptools.HttpRequestParser(cb), httptools.HttpResponseParser(cb)
    start = time.perf_counter_ns()
    for _ in range(n):
        req.feed_data(REQUEST)
        resp.feed_data(RESPONSE)
    return (time.perf_counter_ns() - start) / n / 1000


class _Ends:
    """A consumer as the proxy is one: it takes heads and ends."""

    def __init__(self) -> None:
        self.ends = 0

    def on_request(self, head: object) -> None: ...
    def on_request_end(self, head: object, body_bytes: int) -> None: ...
    def on_response(self, head: object) -> None: ...

    def on_response_end(self, head: object, body_bytes: int) -> None:
        self.ends += 1


def readers(n: int) -> float:
    c = _Ends()
    req, resp = RequestReader(c), ResponseReader(c)
    expect = resp.expect
    start = time.perf_counter_ns()
    for _ in range(n):
        req.feed(REQUEST)
        expect("GET")
        resp.feed(RESPONSE)
    elapsed = (time.perf_counter_ns() - start) / n / 1000
    assert c.ends == n
    return elapsed


def tracked(n: int) -> float:
    t = Http1Tracker()
    recorded = 0
    start = time.perf_counter_ns()
    for i in range(n):
        t.feed_request(REQUEST, i)
        recorded += len(t.feed_response(RESPONSE, i))
    elapsed = (time.perf_counter_ns() - start) / n / 1000
    assert recorded == n
    return elapsed


def main(n: int = 20_000, rounds: int = 15) -> None:
    # many short rounds, interleaved, best of each: on a shared machine a long run is preempted
    b = r = t = float("inf")
    for _ in range(rounds):
        b, r, t = min(b, bare(n)), min(r, readers(n)), min(t, tracked(n))
    print(f"httptools only      : {b:6.2f} us/exchange")
    print(f"Request/ResponseReader: {r:6.2f} us/exchange  ({r / b:.2f}x the bare parsers; goal <= 2x)")
    print(f"Http1Tracker (tap)  : {t:6.2f} us/exchange  ({t / b:.2f}x, {1e6 / t:,.0f} exchanges/s on one core)")


if __name__ == "__main__":
    main()

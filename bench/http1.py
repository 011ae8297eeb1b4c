"""µs per exchange for a small keep-alive GET through Http1Tracker, against bare httptools.

Run: .venv/bin/python bench/http1.py
Reference in the same run: the same bytes through two httptools parsers with empty
callbacks (the floor any httptools-based tracker pays). Reported, not asserted.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlens.protocols.http1 import Http1Tracker

REQUEST = (
    b"GET /api/v1/orders?id=42 HTTP/1.1\r\nHost: orders.shop.svc:8080\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"x-request-id: 6f1c2d3e-1111-2222-3333-444455556666\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Nothing:
    def on_message_begin(self) -> None: ...
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_message_complete(self) -> None: ...


def bare(n: int) -> float:
    cb = _Nothing()
    req, resp = httptools.HttpRequestParser(cb), httptools.HttpResponseParser(cb)
    start = time.perf_counter_ns()
    for _ in range(n):
        req.feed_data(REQUEST)
        resp.feed_data(RESPONSE)
    return (time.perf_counter_ns() - start) / n / 1000


def tracked(n: int) -> float:
    t = Http1Tracker()
    recorded = 0
    start = time.perf_counter_ns()
    for i in range(n):
        t.feed_request(REQUEST, i)
        recorded += len(t.feed_response(RESPONSE, i)) - 1
    elapsed = (time.perf_counter_ns() - start) / n / 1000
    assert recorded == n
    return elapsed


def main(n: int = 200_000) -> None:
    bare(n // 10), tracked(n // 10)  # warm up
    b = min(bare(n) for _ in range(3))
    t = min(tracked(n) for _ in range(3))
    print(f"httptools only : {b:6.2f} us/exchange")
    print(f"Http1Tracker   : {t:6.2f} us/exchange  ({t / b:.1f}x the bare parser, {1e6 / t:,.0f} exchanges/s on one core)")


if __name__ == "__main__":
    main()

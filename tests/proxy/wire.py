"""Raw-socket helpers: send request bytes, read what comes back, split responses apart."""
from __future__ import annotations

import socket

from tests.waiting import PATIENCE_S

# Fields the proxy adds or owns per hop (RFC 9110 7.6.1), and Date, which moves with the clock.
PROXY_FIELDS = {b"traceparent", b"x-request-id", b"connection", b"keep-alive", b"transfer-encoding", b"date"}


def exchange(port: int, data: bytes, timeout: float = PATIENCE_S) -> bytes:
    """Send `data` and read until the server closes (the last request must ask for that)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s, timeout)


def read_all(s: socket.socket, timeout: float = PATIENCE_S) -> bytes:
    """Everything until the peer closes (or resets); `timeout` only expires if it never does."""
    out = bytearray()
    s.settimeout(timeout)
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        line, _, body = body.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return bytes(out)


def normalize(response: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(status line, header lines minus the proxy's fields, decoded body) of one response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in PROXY_FIELDS]
    chunked = any(ln.lower().startswith(b"transfer-encoding:") and b"chunked" in ln.lower() for ln in lines[1:])
    return lines[0], fields, dechunk(body) if chunked else body

"""proxy/connect.py: connections opened within the timeout, and each failure's one answer and record."""
from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from meshlens.proxy import connect
from meshlens.proxy.connect import (DC, DPE, LR, NR, UC, UF, UH, UO, UPE, UPSTREAM_PROTOCOL_ERROR, UPSTREAM_RESET,
                                    UR, URX, UT, LocalReply, failure, no_endpoint, open_connection)
from tests.proxy.conftest import free_port


@pytest.mark.parametrize("exc, reply", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
     LocalReply(503, "upstream connect error: connection refused", "refused", "UF")),
    (TimeoutError(), LocalReply(503, "upstream connect error: timed out", "timeout", "UF")),
    (OSError(errno.ETIMEDOUT, "Connection timed out"),  # the kernel's: an OSError that is a TimeoutError
     LocalReply(503, "upstream connect error: timed out", "timeout", "UF")),
    (OSError(errno.EHOSTUNREACH, "No route to host"),
     LocalReply(503, "upstream connect error: No route to host", "refused", "UF")),
    (OSError(errno.ENETUNREACH, "Network is unreachable"),
     LocalReply(503, "upstream connect error: Network is unreachable", "refused", "UF")),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
     LocalReply(503, "upstream connect error: Name or service not known", "refused", "UF")),
])
def test_every_connect_failure_is_a_503_upstream_connection_failure(exc: OSError, reply: LocalReply) -> None:
    assert failure(exc) == reply


def test_no_endpoint_and_the_upstreams_failures_after_connecting() -> None:
    assert no_endpoint("catalog") == LocalReply(503, "service catalog has no instances", "no_healthy_upstream", "UH")
    assert UPSTREAM_RESET == LocalReply(503, "upstream reset the connection before responding", "reset", "UC")
    assert UPSTREAM_PROTOCOL_ERROR == LocalReply(502, "upstream sent a malformed response", "protocol_error", "UPE")
    assert LocalReply(400, "bad", "protocol_error").flags == ""  # a local reply need not carry a flag


def test_the_flags_are_envoys_short_names() -> None:
    assert [UF, UH, UO, URX, UT, UC, UR, UPE, DC, DPE, NR, LR] == [
        "UF", "UH", "UO", "URX", "UT", "UC", "UR", "UPE", "DC", "DPE", "NR", "LR"]


class Seen(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


def test_open_connection_returns_the_protocol_connected() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        async def main() -> None:
            proto = await open_connection(Seen, ("127.0.0.1", server.getsockname()[1]))
            assert proto.transport is not None and not proto.transport.is_closing()
            proto.transport.close()
        asyncio.run(main())


def test_a_refused_connection_raises_what_failure_names() -> None:
    async def main() -> LocalReply:
        try:
            await open_connection(Seen, ("127.0.0.1", free_port()))
        except OSError as e:
            return failure(e)
        raise AssertionError("connected to a port nothing listens on")
    assert asyncio.run(main()) == LocalReply(503, "upstream connect error: connection refused", "refused", UF)


def test_a_connection_not_accepted_within_connect_timeout_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connect, "CONNECT_TIMEOUT", 0.2)
    # a listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        addr = server.getsockname()
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(addr)
                fillers.append(s)

            async def main() -> LocalReply:
                try:
                    await open_connection(Seen, addr)
                except OSError as e:
                    return failure(e)
                return LocalReply(0, "connected", "")
            got = asyncio.run(main())
        finally:
            for s in fillers:
                s.close()
    if got.status == 0:
        pytest.skip("this kernel accepted past a full backlog: no way to make connect() hang here")
    assert got == LocalReply(503, "upstream connect error: timed out", "timeout", UF)

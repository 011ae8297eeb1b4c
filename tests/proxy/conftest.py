"""Fixtures for the proxy tests: one sample upstream and one proxy process per module."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.proxy.processes import ProxyProcess, SampleService, mesh_yaml

# The module proxy's --header-timeout: short, so a test that waits for it to fire waits little.
HEADER_TIMEOUT_S = 1.0


def free_port() -> int:
    """A port nothing listens on (bound, then released): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream() -> Iterator[SampleService]:
    svc = SampleService().start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def proxy(upstream: SampleService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("proxy")
    p = ProxyProcess(workdir, mesh_yaml(upstream.port, free_port()), "web", "--app-port", str(upstream.port),
                     "--no-record", "--header-timeout", f"{HEADER_TIMEOUT_S:g}")
    p.start()
    yield p
    p.stop()
    p.kill()

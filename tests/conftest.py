"""Fixtures shared by every test package."""
from __future__ import annotations

import pytest

from tests.clickhouse_server import server_fixture
from tests.demo_store import demo_store, start_early, stop_early  # noqa: F401  (session fixture: one `meshlens demo` run)

# One Debian clickhouse-server (18.16) per test session; tests use their own databases.
clickhouse_server = server_fixture(scope="session")


def pytest_collection_finish(session: pytest.Session) -> None:
    start_early(session)  # the demo's load runs while the tests before its first reader do


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_early(session)

"""Fixtures shared by every test package."""
from __future__ import annotations

from tests.clickhouse_server import server_fixture
from tests.demo_store import demo_store  # noqa: F401  (session fixture: one `meshlens demo` run)

# One Debian clickhouse-server (18.16) per test session; tests use their own databases.
clickhouse_server = server_fixture(scope="session")

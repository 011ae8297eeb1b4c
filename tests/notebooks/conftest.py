"""Stores the notebooks run against, reached as the notebooks reach them: through a collector's query URL.

chdb opens one data directory per process, so each store is owned by a collector subprocess and the
kernels (and this test process) only see its http:// query endpoint.
"""
from __future__ import annotations

import pytest

from tests.collector_process import CollectorProcess


@pytest.fixture(scope="session")
def notebook_store_url(demo_store) -> str:
    """The store a `meshlens demo` run filled (tests/demo_store.py; MESHLENS_TEST_DEMO_STORE reuses one)."""
    return demo_store.url


@pytest.fixture(scope="session")
def empty_store_url(tmp_path_factory) -> str:
    """A collector over a fresh store: the schema exists, no call does."""
    with CollectorProcess(tmp_path_factory.mktemp("empty-notebook-store")) as col:
        yield col.query_url

"""One generated store per test module (chdb opens one data directory per process at a time)."""
from __future__ import annotations

import pytest

from meshlens.collector.stores.embedded import EmbeddedStore
from tests.analysis.traffic import generate


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = EmbeddedStore(tmp_path_factory.mktemp("analysis") / "chdb")
    generate(s)
    yield s
    s.close()

"""The `demo_store` session fixture: one `meshlens demo` run, then a collector serving its store for queries.

Tests that need realistic recorded traffic (dashboards, notebooks, the demo's own
tests) take `demo_store` and query `demo_store.url` like any ClickHouse HTTP
store (analysis, clickhouse-connect, Grafana).

For fast iteration, set MESHLENS_TEST_DEMO_STORE to the directory of an existing
demo store (for example /tmp/demo-store, made by
`meshlens demo --duration 90 --any-ports --store chdb:/tmp/demo-store > /tmp/demo-store.out`): the demo
is not run; the directory is copied to a temporary one (so several sessions can
share it and none changes it) and served from there. `.output` is then the text of
`DIR.out` when that file exists (the demo's stdout saved next to the store), else ''.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.collector_process import CollectorProcess

# Observe takes 45 s of it (every recommendation's sample minimum, meshlens/demo/phases.py); the other phases
# share the rest: at 90, 11 s of dry-run, 22 s of enforce (the guards judge ~600 calls each), 11 s of mTLS.
# At 60 they get 15 s between them, and a guard judging ~150 calls rolls back on one slow call as often as not.
DEMO_DURATION_S = 90
# The demo's start (chdb schema, 18 processes), its commands and the guards' end between the phases, and its end
# (flush) around the load; generous on 2 busy cores.
DEMO_TIMEOUT_S = DEMO_DURATION_S + 420
ENV_REUSE = "MESHLENS_TEST_DEMO_STORE"


@dataclass
class DemoStore:
    """A demo's store, served by a collector for the test session."""

    url: str
    """http://127.0.0.1:PORT/ — the query endpoint, usable as a store URL (database meshlens)."""
    store_path: Path
    """The chdb directory the collector serves."""
    output: str
    """The demo's stdout (progress lines, each phase's commands and figures, where to look next)."""
    reused: bool = False
    """True when the store came from MESHLENS_TEST_DEMO_STORE rather than a run in this session."""
    demo_returncode: int | None = None
    demo_stderr: str = field(default="", repr=False)


def run_demo(store_path: Path, duration: float = DEMO_DURATION_S, *extra: str,
             timeout: float = DEMO_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`meshlens demo` on free ports into `store_path`, without any MESHLENS_* settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    # debug: the supervisor logs each child's pid (`started name=… pid=…`), which the tests check are gone after
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", "--log-level", "debug", "demo",
                           "--duration", f"{duration:g}",
                           "--any-ports", "--store", f"chdb:{store_path}", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _existing(path_text: str, tmp: Path) -> tuple[Path, str]:
    src = Path(path_text).expanduser()
    if not src.is_dir():
        pytest.fail(f"{ENV_REUSE}={path_text} is not a directory (make one with `meshlens demo --store chdb:DIR`)")
    copy = tmp / "store"
    # ClickHouse's Atomic databases link tables by relative symlinks: copy the links, not their targets.
    shutil.copytree(src, copy, symlinks=True, ignore=shutil.ignore_patterns("*.lock", "status"))
    out = Path(str(src) + ".out")
    return copy, out.read_text() if out.is_file() else ""


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStore]:
    tmp = tmp_path_factory.mktemp("demo-store")
    reuse = os.environ.get(ENV_REUSE)
    returncode, stderr = None, ""
    if reuse:
        store_path, output = _existing(reuse, tmp)
    else:
        store_path = tmp / "store"
        done = run_demo(store_path)
        returncode, stderr, output = done.returncode, done.stderr, done.stdout
        if done.returncode != 0:
            pytest.fail(f"meshlens demo exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with CollectorProcess(tmp / "collector", f"chdb:{store_path}") as collector:
        yield DemoStore(collector.query_url, store_path, output, bool(reuse), returncode, stderr)

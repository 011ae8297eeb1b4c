"""The `demo_store` session fixture: one `meshlens demo` run, then a collector serving its store for queries.

Tests that need realistic recorded traffic (dashboards, notebooks, the demo's own
tests) take `demo_store` and query `demo_store.url` like any ClickHouse HTTP
store (analysis, clickhouse-connect, Grafana).

The demo is started as soon as the session has collected a test that needs it
(`start_early`, from tests/conftest.py), so that its minutes of paced load run while
the tests before its first reader run; the fixture waits for it to end. Its load is
paced, its figures are judged on calls, not on seconds: a busier machine meanwhile
changes neither what it records nor what its tests check.

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
import tempfile
import time
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


# The fixtures that read the demo's store (panel_store: unless told to use another store, tests/dashboards/conftest.py).
READERS = ("demo_store", "panel_store")


class DemoRun:
    """One `meshlens demo` on free ports into `workdir / "store"`, without any MESHLENS_* settings from the
    environment; its stdout and stderr go to files (no pipe to fill while nobody reads it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.store_path = workdir / "store"
        self.started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
        with open(workdir / "demo.out", "wb") as out, open(workdir / "demo.err", "wb") as err:
            # debug: the supervisor logs each child's pid (`started name=… pid=…`), which the tests check are gone
            self.proc = subprocess.Popen([sys.executable, "-m", "meshlens.cli.main", "--log-level", "debug", "demo",
                                          "--duration", f"{DEMO_DURATION_S:g}", "--any-ports",
                                          "--store", f"chdb:{self.store_path}"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)

    def wait(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it ends; killed past DEMO_TIMEOUT_S from its start."""
        try:
            self.proc.wait(max(0.0, self.started + DEMO_TIMEOUT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"meshlens demo did not end within {DEMO_TIMEOUT_S:g}s")
        out, err = ((self.workdir / name).read_text(errors="replace") for name in ("demo.out", "demo.err"))
        return self.proc.returncode, out, err

    def stop(self) -> None:
        """SIGTERM (the demo stops its children), then SIGKILL if it has not ended in a minute."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


EARLY = pytest.StashKey[DemoRun]()
"""The session's demo, when `start_early` started it (in the config's stash)."""


def start_early(session: pytest.Session) -> None:
    """Start the demo now if a collected test will read its store (and no store is reused)."""
    if session.config.option.collectonly or os.environ.get(ENV_REUSE) or not any(map(_reads_demo, session.items)):
        return
    session.config.stash[EARLY] = DemoRun(Path(tempfile.mkdtemp(prefix="meshlens-test-demo-")))


def stop_early(session: pytest.Session) -> None:
    """At the session's end: a demo still running (the session cut short) stopped, its directory removed."""
    run = session.config.stash.get(EARLY, None)
    if run is not None:
        run.stop()
        shutil.rmtree(run.workdir, ignore_errors=True)
        del session.config.stash[EARLY]


def _reads_demo(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if "demo_store" in names:
        return True
    other = os.environ.get("MESHLENS_TEST_DASHBOARDS_STORE") or os.environ.get("MESHLENS_TEST_DASHBOARDS_OWN_DATA")
    return "panel_store" in names and not other


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
def demo_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStore]:
    tmp = tmp_path_factory.mktemp("demo-store")
    reuse = os.environ.get(ENV_REUSE)
    returncode, stderr = None, ""
    if reuse:
        store_path, output = _existing(reuse, tmp)
    else:
        run = request.config.stash.get(EARLY, None) or DemoRun(tmp)  # not started early: reached by getfixturevalue only
        store_path = run.store_path
        returncode, output, stderr = run.wait()
        if returncode != 0:
            pytest.fail(f"meshlens demo exited with {returncode}:\n{output[-3000:]}\n{stderr[-3000:]}")
    with CollectorProcess(tmp / "collector", f"chdb:{store_path}") as collector:
        yield DemoStore(collector.query_url, store_path, output, bool(reuse), returncode, stderr)

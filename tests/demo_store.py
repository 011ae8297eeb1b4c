"""The `demo_store` session fixture: one `meshlens demo` run, then a collector serving its store for queries.

Tests that need realistic recorded traffic (dashboards, notebooks, the demo's own
tests) take `demo_store` and query `demo_store.url` like any ClickHouse HTTP
store (analysis, clickhouse-connect, Grafana).

The demo is started as soon as the session has collected a test that needs it
(`start_early`, from tests/conftest.py), so that its minutes of paced load run while
the tests before its first reader run; the fixture waits for it to end. Its load is
paced, its figures are judged on calls, not on seconds: a busier machine meanwhile
changes neither what it records nor what its tests check. It runs with --keep-running:
the fixture looks at what it keeps serving, ends it with a Ctrl-C (`.kept`, checked by
tests/demo/test_demo.py), then serves the store with a collector of its own.

For fast iteration, set MESHLENS_TEST_DEMO_STORE to the directory of an existing
demo store (for example /tmp/demo-store, made by
`meshlens demo --duration 90 --any-ports --store chdb:/tmp/demo-store > /tmp/demo-store.out`): the demo
is not run; the directory is copied to a temporary one (so several sessions can
share it and none changes it) and served from there. `.output` is then the text of
`DIR.out` when that file exists (the demo's stdout saved next to the store), else ''.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from meshlens.collector.stores import StoreError, connect
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S

# Observe takes 45 s of it (every recommendation's sample minimum, meshlens/demo/phases.py); the other phases
# share the rest: at 90, 11 s of dry-run, 22 s of enforce (the guards judge ~600 calls each), 11 s of mTLS.
# At 60 they get 15 s between them, and a guard judging ~150 calls rolls back on one slow call as often as not.
DEMO_DURATION_S = 90
# The demo's start (chdb schema, 18 processes), its commands and the guards' end between the phases, and its end
# (flush) around the load; generous on 2 busy cores.
DEMO_TIMEOUT_S = DEMO_DURATION_S + 420
ENV_REUSE = "MESHLENS_TEST_DEMO_STORE"
KEEPS_SERVING = re.compile(r"keeps serving queries at (\S+), the console at (\S+)")


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
    kept: KeptRunning | None = None
    """What its --keep-running served before the Ctrl-C that ended it (None when reused)."""


@dataclass
class KeptRunning:
    """The session's demo runs with --keep-running, so that one run also shows what that flag leaves: seen by the
    fixture (it must end the demo before serving the store itself), checked by tests/demo/test_demo.py."""

    query_url: str
    console_url: str
    """Both as its keeps-serving line names them."""
    children: list[int]
    """Its processes while it kept running."""
    ingress_calls: int = 0
    """Calls from the ingress in the store, read through query_url then."""
    console_status: int = 0
    console_type: str = ""
    """The console page's answer then."""
    error: str = ""
    """Why the store or the console could not be read then ('' when both were)."""
    left: list[int] = field(default_factory=list)
    """Of `children`, those still running once the Ctrl-C (SIGINT) had ended the demo."""


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
                                          "--duration", f"{DEMO_DURATION_S:g}", "--any-ports", "--keep-running",
                                          "--store", f"chdb:{self.store_path}"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)

    def output(self) -> str:
        return (self.workdir / "demo.out").read_text(errors="replace")

    def ended(self) -> tuple[int, str, str, KeptRunning | None]:
        """(exit code, stdout, stderr, what it kept running) once it has ended: when it keeps running, what it
        serves is looked at, then it is sent SIGINT as a Ctrl-C. Killed past DEMO_TIMEOUT_S from its start."""
        deadline = self.started + DEMO_TIMEOUT_S
        while not (m := KEEPS_SERVING.search(self.output())) and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"meshlens demo did not end its story within {DEMO_TIMEOUT_S:g}s")
            time.sleep(0.2)
        kept = None
        if m is not None and self.proc.poll() is None:
            kept = self._look_and_interrupt(m.group(1), m.group(2))
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"meshlens demo did not end within {DEMO_TIMEOUT_S:g}s of its start")
        if kept is not None:
            kept.left = [pid for pid in kept.children if running(pid)]
        return self.proc.returncode, self.output(), (self.workdir / "demo.err").read_text(errors="replace"), kept

    def _look_and_interrupt(self, query_url: str, console_url: str) -> KeptRunning:
        kept = KeptRunning(query_url, console_url, sorted(descendants(self.proc.pid)))
        try:
            store = connect(query_url)
            try:
                [(n,)] = store.query_rows("SELECT count() FROM meshlens.calls WHERE src_service = 'ingress'")
                kept.ingress_calls = int(n)
            finally:
                store.close()
            with urllib.request.urlopen(console_url, timeout=PATIENCE_S) as resp:
                kept.console_status, kept.console_type = resp.status, resp.headers.get("Content-Type", "")
        except (OSError, StoreError, ValueError) as e:  # said by the test that checks it, not by every reader
            kept.error = f"{type(e).__name__}: {e}"
        self.proc.send_signal(signal.SIGINT)
        return kept

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
    returncode, stderr, kept = None, "", None
    if reuse:
        store_path, output = _existing(reuse, tmp)
    else:
        run = request.config.stash.get(EARLY, None) or DemoRun(tmp)  # not started early: reached by getfixturevalue only
        store_path = run.store_path
        returncode, output, stderr, kept = run.ended()
        if returncode != 0 or kept is None:
            said = "exited" if kept is None else "exited after its Ctrl-C"
            pytest.fail(f"meshlens demo {said} with {returncode}:\n{output[-3000:]}\n{stderr[-3000:]}")
    with CollectorProcess(tmp / "collector", f"chdb:{store_path}") as collector:
        yield DemoStore(collector.query_url, store_path, output, bool(reuse), returncode, stderr, kept)


def descendants(root: int) -> set[int]:
    """Every process under `root` now (children, theirs, ...)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """True when `pid` is a live (non-zombie) process of the demo's (a python running meshlens)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"meshlens" in cmdline

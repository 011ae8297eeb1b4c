"""bench/proxy_h2.py in its smallest setting: every path measured, through real nginx, grpcio and sidecars; and
a path that answers wrong (a 5xx, a body of other bytes, a gRPC call that does not end OK) fails it."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import proxy_h2
from bench.proxy import nginx
from tests.waiting import PATIENCE_S

ROOT = Path(__file__).parents[2]
REQUESTS = 40
PATHS = ("direct to the backend", "nginx grpc_pass", "meshlens (recording off)", "meshlens (recording on)",
         "meshlens (recording on, to a sink)")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("nginx", "h2load")),
                                reason="nginx or h2load is not installed: run scripts/install-system.sh")


def bench(*args: str) -> subprocess.CompletedProcess:
    """The bench in a session of its own, so that one that hangs is killed with its nginx and sidecars."""
    proc = subprocess.Popen([sys.executable, "bench/proxy_h2.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=2 * PATIENCE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def small() -> subprocess.CompletedProcess:
    profile = ["--profile", "--profile-seconds", "1"] if proxy_h2.py_spy() else []
    return bench("--requests", str(REQUESTS), "--rounds", "2", "--settings", "1x1", "--grpc-settings", "2x2", *profile)


def test_smallest_setting_measures_every_path_against_nginx(small: subprocess.CompletedProcess) -> None:
    assert small.returncode == 0, small.stdout + small.stderr
    rows = {(m.group(1), m.group(2)): m.groups()[2:] for m in re.finditer(
        r"^(h2 1x1|grpc 2x2) +(\S.*?) +(\d+) +([\d.]+) +([\d.]+) +(\S+ \([\d.-]+\)|) +(\S+ \([\d.-]+\)|)",
        small.stdout, re.M)}
    assert set(rows) == {(row, path) for row in ("h2 1x1", "grpc 2x2") for path in PATHS}, small.stdout
    for (row, path), (rps, _p50, p99, vs, p99_vs) in rows.items():
        assert float(rps) > 0 and float(p99) > 0
        assert (vs == "") == (path == "direct to the backend")
    assert rows["h2 1x1", "nginx grpc_pass"][3] == "1.00x (1.00-1.00)"


def test_profile_splits_the_sidecars_time_between_h2_and_meshlens(small: subprocess.CompletedProcess) -> None:
    if not proxy_h2.py_spy():
        pytest.skip("py-spy is not installed (pip install py-spy)")
    assert small.returncode == 0, small.stdout + small.stderr
    for kind in ("h2 1x1", "grpc 2x2"):
        section = small.stdout.split(f"profile: meshlens (recording off), {kind}, 1 s")[1].split("\nprofile:")[0]
        assert re.search(r"^ +[\d.]+% +h2, hpack, hyperframe: ", section, re.M), section
        assert re.search(r"^ +[\d.]+% +meshlens: .*proxy/h2_", section, re.M), section
        assert re.search(r"^  h2 is \d+% of the sidecar's busy time", section, re.M), section


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """h2c nginx answering 200 "ok", 503, and 200 "okay" (the wrong body); {name: port}."""
    d = tmp_path_factory.mktemp("bench-proxy-h2-answers")
    started = {name: nginx(d / name, f"location / {{ {answer} }}", listen="http2")
               for name, answer in (("ok", 'return 200 "ok";'), ("503", "return 503;"), ("okay", 'return 200 "okay";'))}
    yield {name: port for name, (_, port) in started.items()}
    for proc, _ in started.values():
        proc.terminate()
        proc.wait(PATIENCE_S)


@pytest.mark.parametrize(("answer", "errors"), [
    ("ok", ""),
    ("503", f"{REQUESTS} of {REQUESTS} not 2xx (status codes: 0 2xx, 0 3xx, 0 4xx, {REQUESTS} 5xx)"),
    ("okay", f"{4 * REQUESTS} body bytes for {REQUESTS} answers, not {2 * REQUESTS}"),
])
def test_h2load_names_what_a_path_answered_wrong(answers: dict, tmp_path: Path, answer: str, errors: str) -> None:
    r = proxy_h2.h2load(answers[answer], REQUESTS, proxy_h2.Setting(2, 2), None, tmp_path / "log")
    assert r["errors"] == errors
    assert r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0


def test_grpc_check_reads_the_trailers() -> None:
    server, port = proxy_h2.grpc_backend()
    try:
        assert proxy_h2.grpc_check(port) == ""
    finally:
        server.stop(grace=None)


def test_grpc_check_fails_an_answer_without_grpc_status(answers: dict) -> None:
    assert proxy_h2.grpc_check(answers["ok"]).startswith("a gRPC call ended ")


@pytest.mark.parametrize(("stack", "owner"), [
    (["run (proxy/server.py:403)", "Runner.run (asyncio/runners.py:118)", "run_forever (loop.c:33192)",
      "H2Downstream.data_received (proxy/h2_downstream.py:284)", "H2Connection.receive_data (h2/connection.py:1520)",
      "Logger.isEnabledFor (logging/__init__.py:1738)"], ("h2, hpack, hyperframe", "h2/connection.py")),
    (["run (proxy/server.py:403)", "Runner.run (asyncio/runners.py:118)",
      "Exchange.start (proxy/exchange.py:242)", "EnumType.__call__ (enum.py:712)"], ("meshlens", "proxy/exchange.py")),
    (["run (proxy/server.py:403)", "Runner.run (asyncio/runners.py:118)", "Stream.pump (proxy/h2_downstream.py:1)",
      "write (libc.so.6)"], ("system calls (libc)", "write")),
    (["run (proxy/server.py:403)", "Runner.run (asyncio/runners.py:118)", "uv__io_poll (linux.c:1546)",
      "epoll_pwait (libc.so.6)"], (proxy_h2.IDLE, "epoll_pwait")),
    (["run (proxy/server.py:403)", "Runner.run (asyncio/runners.py:118)", "uv__read (stream.c:1154)"],
     ("event loop and the rest (uvloop, asyncio, interpreter)", "uv__read")),
])
def test_a_sample_is_owned_by_the_innermost_code_below_the_event_loop(stack: list[str], owner: tuple) -> None:
    assert proxy_h2.owner(stack) == owner


@pytest.mark.parametrize(("args", "error"), [
    (["--settings", "0x4"],
     "argument --settings: a setting is CONNECTIONSxSTREAMS, both at least 1, e.g. 4x16; got '0x4'"),
    (["--grpc-settings", "4by16"], "argument --grpc-settings: a setting is CONNECTIONSxSTREAMS"),
    (["--requests", "0"], "argument --requests: must be at least 1, got 0"),
    (["--requests", "8", "--settings", "16x1"], "--requests 8 is fewer than a setting's connections"),
    (["--settings", "", "--grpc-settings", ""], "no setting to run: --settings and --grpc-settings are both empty"),
])
def test_bad_flags_are_one_line(args: list[str], error: str) -> None:
    r = bench(*args)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and error in r.stderr, r.stderr

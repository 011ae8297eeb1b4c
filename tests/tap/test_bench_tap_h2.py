"""bench/tap_h2.py in its smallest setting: it makes its h2c capture, the tap and tshark agree on every
stream of it, and when they do not (tshark told one port of two) the bench fails loudly instead of
printing figures."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import PATIENCE_S

ROOT = Path(__file__).parents[2]
REQUESTS, GRPC_CALLS = 40, 10  # counts, not rates: h2load's on 2 connections, 4 streams in flight each

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("tcpdump", "tshark", "nginx", "h2load")),
    reason="tcpdump, tshark, nginx or h2load is not installed: run scripts/install-system.sh")


def bench(*args: str) -> subprocess.CompletedProcess:
    """The bench in a session of its own, so that a bench that hangs is killed with its nginx and tcpdump."""
    proc = subprocess.Popen([sys.executable, "bench/tap_h2.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    d = tmp_path_factory.mktemp("bench-tap-h2")
    return bench("--requests", str(REQUESTS), "--connections", "2", "--streams", "4", "--grpc-calls",
                 str(GRPC_CALLS), "--rounds", "2", "--workers", "2", "--keep", str(d)), d


def test_smallest_setting_measures_both_readers_on_the_same_streams(small: tuple) -> None:
    r, _ = small
    assert r.returncode == 0, r.stdout + r.stderr
    streams = REQUESTS + GRPC_CALLS
    assert f"agree: {streams} streams, their paths and statuses, in every reader and round and as sent" in r.stdout
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^(meshlens -w1|meshlens -w2|tshark) +([\d.]+) +([\d,]+) +([\d,]+) +([\d.]+) +(\d+) +([\d.]+)x$",
        r.stdout, re.M)}
    assert set(rows) == {"meshlens -w1", "meshlens -w2", "tshark"}, r.stdout
    assert {row[4] for row in rows.values()} == {str(streams)}
    assert rows["tshark"][5] == "1.00"


def test_readers_that_disagree_fail_the_bench(small: tuple) -> None:
    r, d = small
    assert r.returncode == 0, r.stdout + r.stderr
    nginx_port, grpc_port = re.search(r"h2c ports=(\d+),(\d+)", r.stdout).groups()
    # tshark told only the gRPC port decodes the gRPC calls alone: the tap's count is not its
    bad = bench("--pcap", str(d / "h2c.pcap"), "--port", grpc_port, "--rounds", "1", "--workers", "1")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        f"DISAGREE: meshlens -w1 {REQUESTS + GRPC_CALLS} streams, tshark {GRPC_CALLS}")
    good = bench("--pcap", str(d / "h2c.pcap"), "--port", grpc_port, "--port", nginx_port, "--rounds", "1",
                 "--workers", "1")
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"agree: {REQUESTS + GRPC_CALLS} streams" in good.stdout


@pytest.mark.parametrize(("args", "error"), [
    (["--pcap", "x.pcap"], "--pcap and --port go together: tshark decodes h2c only on the ports it is told"),
    (["--port", "80"], "--pcap and --port go together: tshark decodes h2c only on the ports it is told"),
    (["--pcap", "/nonexistent.pcap", "--port", "80"], "no such file: /nonexistent.pcap"),
    (["--pcap", "x.pcap", "--port", "0"], "argument --port: port must be 1..65535, got 0"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
])
def test_bad_flags_are_one_line(args: list[str], error: str) -> None:
    r = bench(*args)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and error in r.stderr, r.stderr

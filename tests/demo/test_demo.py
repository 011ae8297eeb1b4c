"""`meshlens demo`: the recorded story (through the session's demo_store), clean stops, and flag errors."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshlens.analysis.recommend import recommend
from meshlens.collector.stores import connect
from tests.demo_store import DemoStore, descendants, running

WIRE_ON = "wire        tap on lo"


@pytest.fixture(scope="module")
def report(demo_store: DemoStore):
    store = connect(demo_store.url)
    store.use_database()
    try:
        yield recommend(store)
    finally:
        store.close()


def rows(store_url: str, sql: str) -> list[tuple]:
    store = connect(store_url)
    store.use_database()
    try:
        return [tuple(r) for r in store.query_rows(sql)]
    finally:
        store.close()


def find(report, kind: str, **target: str) -> list:
    return [r for r in report.recommendations if r.kind == kind
            and all(r.target.get(k) == v for k, v in target.items())]


# -- the story ----------------------------------------------------------------------------------

def test_timeout_for_cart_to_payment_from_its_slow_tail(report) -> None:
    [rec] = find(report, "timeout", caller="cart", callee="payment", method="POST", route="/charge")
    assert rec.policy is not None
    # The slow tail (0.8-1.5 s) sets the timeout, not the body of the distribution (~20 ms).
    assert rec.policy["timeout_s"] >= 0.8
    assert rec.evidence.figures["max_ok_s"] >= 0.8


def test_retries_and_outlier_ejection_for_the_flaky_inventory_instance(report, demo_store: DemoStore) -> None:
    [retry] = find(report, "retry", caller="cart", callee="inventory", method="GET", route="/stock/{id}")
    assert retry.policy is not None and retry.policy["attempts"] >= 1
    [flaky] = rows(demo_store.url, "SELECT DISTINCT concat(dst_addr, ':', toString(dst_port)) FROM calls "
                                   "WHERE observer = 'client' AND dst_subset = 'inventory-3'")
    [outlier] = find(report, "outlier", callee="inventory")
    assert outlier.policy is not None
    assert outlier.policy["eject"][:1] == [flaky[0]] or flaky[0] in outlier.policy["eject"]
    healthy = rows(demo_store.url, "SELECT DISTINCT concat(dst_addr, ':', toString(dst_port)) FROM calls "
                                   "WHERE observer = 'client' AND dst_subset IN ('inventory-1', 'inventory-2')")
    assert not {h[0] for h in healthy} & set(outlier.policy["eject"])


def test_no_retry_for_the_persistently_failing_route(report) -> None:
    [rec] = find(report, "retry", caller="frontend", callee="catalog", method="GET", route="/items/{id}/reviews")
    assert rec.policy is None
    assert rec.evidence.figures.get("retries_off") and "persistent" in rec.evidence.reason


def test_mtls_names_the_unmeshed_caller(report) -> None:
    [rec] = find(report, "mtls", callee="catalog")
    assert "reports" in rec.evidence.figures["blockers"]
    assert rec.policy is not None and rec.policy["mode"] == "PERMISSIVE"


def test_the_demo_output_names_the_faults(demo_store: DemoStore) -> None:
    if demo_store.reused and not demo_store.output:
        pytest.skip("reused store without its DIR.out")
    lines = demo_store.output.splitlines()
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("recommendations for the shop")):]
    table = table[:table.index("")]  # the table ends where the next phase's lines begin

    def row(*words: str) -> str:
        found = [ln for ln in table if all(re.search(rf"(^|\s){re.escape(w)}(\s|$)", ln) for w in words)]
        assert found, f"no row with {words} in:\n" + "\n".join(table)
        return found[0]

    assert "timeout" in row("timeout", "cart", "payment", "/charge")
    assert "retry attempts=" in row("retry", "cart", "inventory", "/stock/{id}")
    assert "eject inventory-3 (127.0.0.1:" in row("outlier", "inventory")  # the flaky instance, by its name
    assert "persistent" in row("retry", "frontend", "catalog", "/items/{id}/reviews")
    assert "reports" in row("mtls", "catalog")
    assert any(ln.startswith("  query endpoint") for ln in lines)
    assert any(ln.startswith("  every change") and "mesh_changes" in ln for ln in lines)


# -- what was recorded --------------------------------------------------------------------------

def test_every_observer_recorded_calls(demo_store: DemoStore) -> None:
    counts = dict(rows(demo_store.url, "SELECT toString(observer), count() FROM calls GROUP BY 1"))
    for observer in ("client", "server", "otlp"):
        assert counts.get(observer, 0) > 0, counts
    if WIRE_ON in demo_store.output:
        assert counts.get("wire", 0) > 0, counts


def test_the_unmeshed_caller_appears_without_a_sidecar(demo_store: DemoStore) -> None:
    by_observer = dict(rows(demo_store.url, "SELECT toString(observer), count() FROM calls "
                                            "WHERE src_service = 'reports' AND dst_service = 'catalog' GROUP BY 1"))
    assert by_observer.get("otlp", 0) > 0
    assert by_observer.get("client", 0) == 0  # no sidecar of its own


def test_spans_land_in_otel_traces_as_one_trace_per_request(demo_store: DemoStore) -> None:
    services = {r[0] for r in rows(demo_store.url, "SELECT DISTINCT ServiceName FROM otel_traces")}
    assert {"frontend", "cart", "payment", "inventory", "catalog", "reports"} <= services
    [(deep,)] = rows(demo_store.url, "SELECT max(c) FROM (SELECT TraceId, uniqExact(ServiceName) AS c "
                                     "FROM otel_traces GROUP BY TraceId)")
    assert deep >= 4  # frontend -> cart -> inventory/payment in one trace, through two sidecars per hop
    [(dup,)] = rows(demo_store.url, "SELECT count() - uniqExact(SpanId) FROM otel_traces")
    assert dup == 0  # apps and sidecars each report their own spans; the tap none


# -- processes ----------------------------------------------------------------------------------

def demo_env(tmp_path: Path) -> dict[str, str]:
    """No MESHLENS_* settings; the demo's work dir under `tmp_path`: a demo killed, or failing, leaves it (its logs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    env["TMPDIR"] = str(tmp_path)
    return env


def _started_pids(stderr: str) -> dict[int, str]:
    return {int(m.group(2)): m.group(1) for m in re.finditer(r"msg=started name=(\S+) pid=(\d+)", stderr)}


def test_no_process_left_behind_after_the_demo(demo_store: DemoStore) -> None:
    if demo_store.reused:
        pytest.skip("the demo did not run in this session")
    pids = _started_pids(demo_store.demo_stderr)
    # collector, control plane, 8 sidecars, 7 apps, 2 callers (+ tap), and the commands of each phase
    assert len(pids) >= 25, demo_store.demo_stderr[-2000:]
    assert [name for pid, name in pids.items() if running(pid)] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_load_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    env = demo_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "meshlens.cli.main", "--log-level", "debug", "demo",
                             "--duration", "600", "--any-ports", "--no-tap", "--rate", "5",
                             "--store", f"chdb:{tmp_path / 'store'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out = _until_load_runs(proc)
        children = descendants(proc.pid)
        assert len(children) >= 17, out  # collector, control plane, 8 sidecars, 7 apps, 2 callers
        time.sleep(2)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"{sig.name}: stopping" in rest
    assert [pid for pid in children if running(pid)] == []


# -- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--duration", "soon"], "not a number of seconds: 'soon'"),
    (["--duration", "0"], "must be more than 0 seconds"),
    (["--rate", "1000"], "--rate is at most 100"),
    (["--store", "http://127.0.0.1:8123/"], "--store must be chdb:PATH"),
    (["--query-port", "70000"], "port must be 0..65535"),
    (["--control-port", "-1"], "port must be 0..65535"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_give_one_line_errors(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "demo", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


def test_a_busy_port_is_one_line_and_leaves_nothingrunning(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "demo", "--duration", "5", "--no-tap",
                               "--otlp-http-port", "0", "--otlp-grpc-port", "0", "--query-port", str(port),
                               "--store", f"chdb:{tmp_path / 'store'}"], capture_output=True, text=True, timeout=180,
                              env=demo_env(tmp_path))
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("meshlens demo: collector exited") and "cannot listen" in line


def _until_load_runs(proc: subprocess.Popen) -> str:
    """Read the demo's stdout until its `load` line (every child is up); what was read."""
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("load "):
            break
    return "".join(out)


def test_children_stop_on_their_own_when_the_demo_is_killed(tmp_path: Path) -> None:
    """The safety net: SIGKILL leaves the demo no chance to clean up; PR_SET_PDEATHSIG stops the children."""
    env = demo_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "meshlens.cli.main", "demo", "--duration", "600", "--any-ports",
                             "--no-tap", "--rate", "5", "--store", f"chdb:{tmp_path / 'store'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        out = _until_load_runs(proc)
        children = descendants(proc.pid)
        assert len(children) >= 16, out
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 120  # a bound on the wait, not a measurement: the collector drains first
    while [pid for pid in children if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid in children if running(pid)] == []


def test_keep_running_serves_queries_and_the_console_until_ctrl_c(demo_store: DemoStore) -> None:
    """The session's demo ran with --keep-running (tests/demo_store.py looked at it, then sent the Ctrl-C)."""
    kept = demo_store.kept
    if kept is None:
        pytest.skip("the demo did not run in this session")
    console = next(ln.split()[1] for ln in demo_store.output.splitlines() if ln.startswith("console "))
    assert kept.console_url == console  # the one printed at the start
    assert len(kept.children) == 2  # only the collector and the control plane are left
    assert kept.error == ""
    assert kept.ingress_calls > 0
    assert kept.console_status == 200 and "html" in kept.console_type
    assert demo_store.demo_returncode == 0, demo_store.demo_stderr[-2000:]
    assert kept.left == []

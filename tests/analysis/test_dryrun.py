"""The dry-run report over calls with known ground truth: a timeout tighter than the calls have become
(its what-if said it would cut none), retries over transient 503s as expected, the estimate of enforce."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from meshlens.analysis.dryrun import dryrun_report
from meshlens.analysis.proposal import EVIDENCE, OBSERVED, RECOMMENDED
from meshlens.analysis.scope import NoData, UnknownService
from meshlens.analysis.window import Window
from meshlens.collector.columns import to_table
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.stores.embedded import EmbeddedStore

T0 = (datetime.now(timezone.utc) - timedelta(hours=1)).replace(microsecond=0)
N = 4000
TRANSIENT = 0.02        # 503s, in both modes
SLOW_OBSERVE = 0.001    # calls over the timeout while observed (what the recommendation saw)
SLOW_DRY = 0.05         # and in dry-run: the service got slower since
TIMEOUT_S = 0.5
DENIED = 40             # every 40th call in dry-run: would_deny, on the server's rows only
WINDOW = Window(T0 - timedelta(minutes=1), T0 + timedelta(hours=1))


def _rows(rng, mode: str, slow_share: float, offset_s: float) -> dict[str, list]:
    failed = rng.uniform(size=N) < TRANSIENT
    slow = ~failed & (rng.uniform(size=N) < slow_share)
    dur = np.where(slow, 0.8, np.where(failed, 0.002, rng.uniform(0.01, 0.03, N)))
    action = [""] * N
    if mode == "dry-run":
        action = ["would_timeout" if s else "would_retry" if f else "" for s, f in zip(slow, failed)]
    return {"time": [int((T0.timestamp() + offset_s + i * 0.1) * 1e9) for i in range(N)],
            "duration_ns": (dur * 1e9).astype(np.uint64).tolist(), "observer": ["client"] * N,
            "src_service": ["cart"] * N, "dst_service": ["payment"] * N, "dst_addr": ["10.0.0.1"] * N,
            "dst_port": [80] * N, "protocol": ["http/1.1"] * N, "method": ["POST"] * N,
            "path": ["/charge"] * N, "status": np.where(failed, 503, 200).astype(np.uint16).tolist(),
            "mode": [mode] * N, "action": action}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dryrun") / "chdb"
    s = EmbeddedStore(path)
    migrate(s, Layout())
    s.use_database()
    rng = np.random.default_rng(7)
    for mode, slow, offset in (("observe", SLOW_OBSERVE, 0), ("dry-run", SLOW_DRY, N * 0.1 + 10)):
        rows = _rows(rng, mode, slow, offset)
        s.insert("meshlens.calls", to_table("calls", rows), f"dryrun-{mode}")
        # payment's own sidecar saw the same calls; its AuthorizationPolicy would deny every DENIED-th one
        rows |= {"observer": ["server"] * N, "action": [
            "would_deny" if mode == "dry-run" and i % DENIED == 0 else "" for i in range(N)]}
        s.insert("meshlens.calls", to_table("calls", rows), f"dryrun-{mode}-server")
    s.close()  # the CLI's test opens it in its own process
    return path


@pytest.fixture
def store(store_dir):
    s = EmbeddedStore(store_dir)
    s.use_database()
    yield s
    s.close()


def stored_vs(cut_share: float, transient: int, recovered: float) -> dict:
    """The VirtualService `recommend --apply` would have stored, with its what-if."""
    evidence = [
        {"kind": "timeout", "target": {"caller": "cart", "callee": "payment", "method": "POST", "route": "/charge"},
         "policy": {"timeout_s": TIMEOUT_S}, "evidence": {}, "whatif": {"n": N, "cut": int(cut_share * N), "cut_ok": 0,
                                                                         "cut_share": cut_share}},
        {"kind": "retry", "target": {"caller": "cart", "callee": "payment", "method": "POST", "route": "/charge"},
         "policy": {"attempts": 2}, "evidence": {}, "whatif": {"n": N, "transient_failures": transient,
                                                             "recovered": recovered}}]
    observed = {"n": N, "failed": 80, "error_rate": 0.02, "p50_s": 0.02, "p99_s": 0.03}
    return {"kind": "VirtualService", "metadata": {"name": "payment", "annotations": {
        RECOMMENDED: "{}", EVIDENCE: json.dumps(evidence), OBSERVED: json.dumps(observed)}},
        "spec": {"hosts": ["payment"], "http": [{"timeout": "500ms", "retries": {"attempts": 2},
                                                 "route": [{"destination": {"host": "payment"}}]}]}}


def test_a_timeout_tighter_than_the_calls_now_is_said_to_disagree_and_to_fail_more_calls(store):
    r = dryrun_report(store, WINDOW, "payment", [stored_vs(0.0, int(N * TRANSIENT), N * TRANSIENT * 0.98)])
    words = {p.word: p for p in r.policies}
    assert set(words) == {"would_timeout", "would_retry", "would_deny"}
    assert words["would_deny"].n == N // DENIED and r.refused == {"would_deny": N // DENIED, "would_rate_limit": 0}
    assert r.dry_run.n == N  # one observer per edge: the caller's rows
    t = words["would_timeout"]
    assert t.failed == 0 and abs(t.share - SLOW_DRY * (1 - TRANSIENT)) < 0.01 and len(t.examples) == 3
    assert t.examples[0]["status"] == 200 and t.examples[0]["duration_ms"] == pytest.approx(800, abs=1)
    assert words["would_retry"].n == words["would_retry"].failed == r.dry_run.failed
    # enforced: the slow calls fail at the timeout, the 503s are retried and ~98% recovered
    expected_failed = r.dry_run.failed + t.n - round(r.dry_run.failed * 0.98)
    assert r.estimated.failed == expected_failed and r.estimated.p99_s == pytest.approx(TIMEOUT_S, abs=0.001)
    assert r.observe["n"] == N and r.observe["failed"] == pytest.approx(N * TRANSIENT, rel=0.25)
    text = " ".join(r.findings)
    assert "DISAGREES: the recommendation expected 0.00% of calls cut" in text
    assert "callers would see MORE failures" in text and "would_retry agrees" in text
    assert "dry-run report for payment" in r.text() and json.dumps(r.as_dict())


def test_without_stored_policies_the_estimate_uses_the_window_itself(store):
    r = dryrun_report(store, WINDOW, "payment")
    assert all(not p.expected for p in r.policies) and r.observe["window"]
    assert not any("agrees" in f or "DISAGREES" in f for f in r.findings)


def test_a_window_without_dry_run_or_a_service_without_calls_is_one_line(store):
    with pytest.raises(NoData, match="no calls to payment in dry-run in .*: put it in dry-run"):
        dryrun_report(store, Window(T0 - timedelta(minutes=1), T0 + timedelta(seconds=N * 0.1 - 1)), "payment")
    with pytest.raises(UnknownService):
        dryrun_report(store, WINDOW, "nobody")


def test_the_command_reports_in_text_and_json_and_says_when_no_what_if_can_be_read(store_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "meshlens.cli.main", "dryrun", "report", *a,
                                     "--store", f"chdb:{store_dir}", "--control", "http://127.0.0.1:9"],
                                    capture_output=True, text=True, env=env, timeout=120)
    out = run("payment")
    assert out.returncode == 0, out.stderr
    assert "would_timeout" in out.stdout and "enforced, estimated" in out.stdout
    assert out.stderr.startswith("no what-if to compare with: cannot reach the control plane")
    assert json.loads(run("payment", "--format", "json").stdout)["dry_run"]["n"] == N
    empty = run("payment", "--until", T0.isoformat())
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
    assert "no calls in the window" in empty.stderr
    nobody = run("nobody")
    assert nobody.returncode == 2 and "no calls to or from service 'nobody'" in nobody.stderr


def test_a_window_without_observe_takes_the_observe_figures_stored_with_the_policies(store):
    dry_only = Window(T0 + timedelta(seconds=N * 0.1 + 5), WINDOW.until)
    r = dryrun_report(store, dry_only, "payment", [stored_vs(0.0, 80, 78.4)])
    assert r.observe == {"n": N, "failed": 80, "error_rate": 0.02, "p50_s": 0.02, "p99_s": 0.03}
    assert dryrun_report(store, dry_only, "payment").observe is None

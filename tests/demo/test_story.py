"""The demo's phases, each checked where it leaves its mark: the control plane's changes (mesh_changes), the calls'
modes and actions, the figures printed against a query of the same store, and the lines that tell the story.

All read the session's one demo run (tests/demo_store.py). What a guard decides depends on this machine's
hiccups (a slow call in a short window is a p99), so no test here assumes an outcome: each checks that the
outcome printed is the one stored, and the policies' effects on the calls made in enforce.
"""
from __future__ import annotations

import re

import pytest

from tests.demo.test_demo import rows
from tests.demo_store import DemoStore

FAILED = "(error != '' OR status >= 500)"
CART = "spiffe://cluster.local/ns/default/sa/cart"


def output(demo_store: DemoStore) -> str:
    if not demo_store.output:
        pytest.skip("reused store without its DIR.out")
    return demo_store.output


def phase_lines(text: str, name: str) -> list[str]:
    """The lines of one phase: from its announcement to the next one (or the end of the run)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"phase \d/4 {re.escape(name)},", ln))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"phase \d/4 |stopping the load", lines[i])),
               len(lines))
    return lines[start:end]


def has(word: str) -> str:
    return f"has(splitByChar(',', toString(action)), '{word}')"


def between(since: str, until: str) -> str:
    """The window of two printed times (ISO, UTC, whole seconds)."""
    def ts(t: str) -> str:
        return f"toDateTime64('{t.replace('T', ' ').removesuffix('Z')}', 9, 'UTC')"
    return f"time >= {ts(since)} AND time < {ts(until)}"


def recorded_window(text: str) -> tuple[str, str]:
    m = re.search(r"^identities  calls to payment, (\S+)\.\.(\S+), as its sidecar recorded them:$", text, re.M)
    assert m, text
    return m.group(1), m.group(2)


# -- the run's shape --------------------------------------------------------------------------------------

def test_the_console_is_printed_at_the_start_and_each_phase_is_announced_in_order(demo_store: DemoStore) -> None:
    lines = output(demo_store).splitlines()
    console = [i for i, ln in enumerate(lines) if re.fullmatch(r"console {5}http://127\.0\.0\.1:\d+/console/?", ln)]
    phases = [i for i, ln in enumerate(lines) if re.match(r"phase \d/4 ", ln)]
    assert console and phases and console[0] < phases[0]
    assert [lines[i].split(",")[0] for i in phases] == [
        "phase 1/4 observe", "phase 2/4 dry-run", "phase 3/4 enforce", "phase 4/4 mTLS"]


# -- dry-run ----------------------------------------------------------------------------------------------

def test_the_recommendations_went_to_dry_run_with_their_reason(demo_store: DemoStore) -> None:
    changes = rows(demo_store.url, "SELECT name, from_mode, to_mode, who, reason FROM mesh_changes FINAL "
                                   "WHERE kind = 'Mode' ORDER BY revision")
    first = {name: (f, t, reason) for name, f, t, who, reason in reversed(changes)}
    assert {name for name, f, t, _, _ in changes if (f, t) == ("observe", "dry-run")} == {"inventory", "payment"}
    for service in ("inventory", "payment"):
        f, t, reason = first[service]
        assert (f, t) == ("observe", "dry-run") and reason.startswith("meshlens recommend: window "), changes
    kinds = {r[0] for r in rows(demo_store.url, "SELECT DISTINCT kind FROM mesh_changes FINAL "
                                                "WHERE service = 'inventory'")}
    assert {"VirtualService", "DestinationRule", "Mode"} <= kinds


def test_dry_run_notes_what_the_policies_would_have_done_and_changes_nothing(demo_store: DemoStore) -> None:
    [(n, would_retry, retried, failed)] = rows(demo_store.url, f"""SELECT count(), countIf({has('would_retry')}),
        countIf({has('retried')}), countIf({FAILED}) FROM calls WHERE observer = 'client' AND src_service = 'cart'
        AND dst_service = 'inventory' AND mode = 'dry-run'""")
    assert n > 0 and would_retry > 0 and retried == 0
    assert would_retry <= failed  # only failed calls would have been retried, and they still failed
    ejected = rows(demo_store.url, f"SELECT DISTINCT dst_subset FROM calls WHERE observer = 'client' "
                                   f"AND dst_service = 'inventory' AND mode = 'dry-run' AND {has('would_eject')}")
    assert set(ejected) <= {("inventory-3",)}  # when an ejection would have happened, of the flaky one only


def test_the_dry_run_reports_are_printed_for_inventory_and_payment(demo_store: DemoStore) -> None:
    text = "\n".join(phase_lines(output(demo_store), "dry-run"))
    for service in ("inventory", "payment"):
        assert f"$ meshlens dryrun report {service} --since " in text
        assert f"dry-run report for {service}, " in text
    assert re.search(r"would_retry +\d+", text)


# -- enforce ----------------------------------------------------------------------------------------------

def test_each_switch_to_enforce_is_guarded_and_its_outcome_printed_as_stored(demo_store: DemoStore) -> None:
    text = "\n".join(phase_lines(output(demo_store), "enforce"))
    guards = rows(demo_store.url, "SELECT name, after, reason FROM mesh_changes FINAL WHERE kind = 'Guard' "
                                  "AND who = 'meshlens-guard' ORDER BY revision")
    ended = {name: reason for name, _, reason in guards}
    assert set(ended) == {"inventory", "payment"}, guards
    for service, reason in ended.items():
        m = re.search(rf"^    {service}: (passed|rolled-back|inconclusive) \(started ", text, re.M)
        assert m, text
        assert reason.startswith("guard: ") and f"      {reason}" in text
        if m.group(1) == "rolled-back":  # the guard's own change: back to dry-run, its reason the figures
            back = rows(demo_store.url, f"SELECT reason FROM mesh_changes FINAL WHERE kind = 'Mode' AND name = "
                                        f"'{service}' AND from_mode = 'enforce' AND to_mode = 'dry-run' "
                                        f"AND who = 'meshlens-guard'")
            assert back == [(reason,)]
    switched = rows(demo_store.url, "SELECT name, reason FROM mesh_changes FINAL WHERE kind = 'Mode' "
                                    "AND from_mode = 'dry-run' AND to_mode = 'enforce' ORDER BY revision")
    assert sorted(name for name, _ in switched) == ["inventory", "payment"]  # each once, catalog never
    assert all(reason == "meshlens demo: the recommended policies, guarded" for _, reason in switched)


def test_enforced_retries_and_ejection_keep_inventorys_failures_from_cart(demo_store: DemoStore) -> None:
    figures = dict((m, (n, failed, ejected, flaky)) for m, n, failed, ejected, flaky in rows(demo_store.url, f"""
        SELECT toString(mode), count(), countIf({FAILED}), countIf({has('ejected')}),
               countIf(dst_subset = 'inventory-3')
        FROM calls WHERE observer = 'client' AND src_service = 'cart' AND dst_service = 'inventory' GROUP BY 1"""))
    n, failed, ejected, flaky = figures["enforce"]
    on, ofailed, _, oflaky = figures["observe"]
    # Ejection enforced: it tripped in enforce, or inventory-3 was ejected since dry-run (its state is kept) and
    # the traffic went to the others (30 s at least each time, and it is found out again within seconds).
    assert ejected > 0 or flaky / n < (oflaky / on) / 2, figures
    # What still reached it and failed was retried on another instance: cart meets far fewer failures.
    assert failed / n < (ofailed / on) / 2, figures


def test_the_before_and_after_line_is_what_the_store_holds(demo_store: DemoStore) -> None:
    lines = phase_lines(output(demo_store), "enforce")
    i = next(i for i, ln in enumerate(lines) if ln.startswith("shoppers "))
    m = re.fullmatch(r"shoppers {4}failed ([\d.]+)% -> ([\d.]+)%, p99 ([\d,]+) ms -> ([\d,]+) ms \(observe -> enforce: "
                     r"([\d,]+) -> ([\d,]+) requests as the ingress sidecar saw them\)", lines[i])
    w = re.fullmatch(r" {12}observe (\S+)\.\.(\S+), enforce (\S+)\.\.(\S+)", lines[i + 1])
    assert m and w, lines[i:i + 2]
    for k, (since, until) in enumerate([(w.group(1), w.group(2)), (w.group(3), w.group(4))]):
        [(n, failed, p99)] = rows(demo_store.url, f"""SELECT count(), countIf({FAILED}),
            quantileExact(0.99)(duration_ns) FROM calls WHERE observer = 'client' AND src_service = 'ingress'
            AND dst_service = 'frontend' AND {between(since, until)}""")
        assert n > 0
        assert m.group(1 + k) == f"{100 * failed / n:.1f}"
        assert m.group(3 + k) == f"{p99 / 1e6:,.0f}"
        assert m.group(5 + k) == f"{n:,}"


# -- mTLS -------------------------------------------------------------------------------------------------

def test_readiness_names_reports_for_catalog_and_the_gate_refuses_strict_there(demo_store: DemoStore) -> None:
    text = "\n".join(phase_lines(output(demo_store), "mTLS"))
    assert "    catalog: blocked by reports; would break under STRICT now: reports" in text
    assert "    payment: STRICT-ready; would break under STRICT now: no one" in text
    # The gate reads up to now: a call whose caller's span is not in yet may add its address to the names.
    refused = re.search(r"\$ meshlens mode set catalog enforce .*\n    meshlens mode: STRICT mTLS would refuse "
                        r"plaintext callers of the last 24 h: catalog: (?:[\d.]+ \(\d+ plaintext calls, last \S+\), )*"
                        r"reports \(\d+ plaintext calls", text)
    assert refused, text
    tried = rows(demo_store.url, "SELECT count() FROM mesh_changes FINAL WHERE kind = 'Mode' AND name = 'catalog' "
                                 "AND to_mode = 'enforce'")
    assert tried == [(0,)]  # refused: nothing changed


def test_strict_on_payment_leaves_carts_identity_on_every_call_and_refuses_plaintext(demo_store: DemoStore) -> None:
    text = "\n".join(phase_lines(output(demo_store), "mTLS"))
    assert re.search(r"^payment {5}STRICT enforced( since its switch to enforce)?: only mTLS callers are served$",
                     text, re.M)
    assert "plaintext   to payment's sidecar, as a caller with no sidecar would send it: closed with no answer" in text
    seen = rows(demo_store.url, """SELECT tls, peer_identity, error, count() FROM calls
        WHERE observer = 'server' AND dst_service = 'payment' AND mode = 'enforce' AND time > (SELECT min(time)
            FROM mesh_changes FINAL WHERE kind = 'Mode' AND name = 'payment' AND to_mode = 'enforce')
        GROUP BY ALL""")
    served = [(tls, peer, n) for tls, peer, error, n in seen if error != "plaintext_refused"]
    assert served and all(tls and peer == CART for tls, peer, _ in served), seen
    assert any(error == "plaintext_refused" and not tls for tls, _, error, _ in seen), seen  # the demo's probe
    since, until = recorded_window(text)
    printed = rows(demo_store.url, f"""SELECT tls, peer_identity, error, count() FROM calls WHERE observer = 'server'
        AND dst_service = 'payment' AND {between(since, until)} GROUP BY ALL ORDER BY 4 DESC""")
    lines = text[text.index("identities  calls to payment, "):].splitlines()[1:1 + len(printed)]
    assert [ln.split() for ln in lines] == [
        [f"{n:,}", "mTLS" if tls else "plaintext", peer or "(none)", *([error] if error else [])]
        for tls, peer, error, n in printed]
    assert any(peer == CART for _, peer, _, _ in printed)
    assert any(error == "plaintext_refused" for _, _, error, _ in printed)  # the probe, in the window printed

"""The phases after the start, with the shop under load all along: observe and the recommendations, the
recommendations stored as dry-run and its report, guarded enforcement and the shoppers' before and after,
then mTLS: readiness, the gate, STRICT, the identities on the calls.

Each step is what a user would do: a `meshlens` command (commands.py), printed with its output,
or a figure read from the store (figures.py). A step that cannot happen (too few calls for a
recommendation or a guard at a short --duration) says why and the story goes on without it.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from meshlens.control.client import ControlClient, ControlError
from meshlens.demo import figures, topology
from meshlens.demo.commands import Commands
from meshlens.demo.figures import Span
from meshlens.demo.phases import Phase
from meshlens.demo.progress import query

__all__ = ["Story"]

# The guards' outcome comes SETTLE_S (control/guard.py) after their window, at their next interval: a bound on
# the wait for it past the window, on a busy machine.
GUARD_END_MAX_S = 60.0
GUARD_INTERVAL_S = 5.0  # the guards' own default
# The guards compare p99 over every call, failed ones too: a retry turns a fast failure into a success that took a
# backoff (Envoy's 25 ms base, fully jittered) and a second attempt longer, so inventory's p99 rises by ~20 ms
# as its failures go away. The guards' default (5 ms) would roll that back; this is the retries' price.
GUARD_MIN_P99_INCREASE = "50ms"
# The newest calls reach the store from each observer a second or two apart: a plaintext call whose caller's
# span is not in yet reads, for that moment, as a caller of its own (its address). Readiness reads up to this long
# ago.
READINESS_UNTIL = "5s"
# The collector holds what the sidecars sent within a second or two; two equal counts this far apart say the
# window's calls are all in.
SETTLE_POLL_S = 2.0
SETTLE_MAX_S = 30.0
PROBE_TIMEOUT_S = 10.0
STRICT = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {service}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: {service}}}}}
  mtls: {{mode: STRICT}}
"""


@dataclass
class Stage:
    """What the story needs of the running demo."""

    out: TextIO
    commands: Commands
    control: ControlClient
    query_url: str
    workdir: Path
    hold: Callable[..., tuple[float, float]]
    """hold(phase, until=None, longest=0.0): the load runs `phase.seconds` (then until `until()`, at most
    `longest` more) with progress; (start, end) as epoch seconds."""
    wait: Callable[[float], None]
    """Sleep, unless Ctrl-C comes first."""
    inbound: dict[str, int] = field(default_factory=dict)
    """Each instance's sidecar inbound port, by instance name."""
    known: set[str] = field(default_factory=set)


class Story:
    def __init__(self, stage: Stage) -> None:
        self.s = stage
        self.spans: dict[str, Span] = {}

    def say(self, text: str = "") -> None:
        self.s.out.write(text + "\n")
        self.s.out.flush()

    def announce(self, phase: Phase) -> None:
        self.say()
        self.say(phase.announcement())

    # -- 1. observe ---------------------------------------------------------------------------------

    def observe(self, phase: Phase) -> Span:
        self.announce(phase)
        span = self.spans["observe"] = Span.of(*self.s.hold(phase))
        self._settled(span)
        self._recommendations(span)
        return span

    def _settled(self, span: Span) -> None:
        """Until two counts of the window's calls agree: its last calls are in the store."""
        deadline = time.monotonic() + SETTLE_MAX_S
        last = -1
        while time.monotonic() < deadline:
            n = int(query(self.s.query_url, f"SELECT count() FROM calls WHERE {span.where()} FORMAT TSV"))
            if n == last:
                return
            last = n
            self.s.wait(SETTLE_POLL_S)

    def _recommendations(self, span: Span) -> None:
        """The recommendations of the observe window, the shop's rows (summary.py), in-process."""
        from meshlens.analysis.recommend import recommend
        from meshlens.analysis.scope import NoData
        from meshlens.collector.stores import connect
        from meshlens.demo import summary

        store = connect(self.s.query_url)
        try:
            store.use_database()
            report = recommend(store, span.window())
        except NoData as e:
            self.say(f"no recommendations: {e}")
            return
        finally:
            store.close()
        instances = {f"127.0.0.1:{port}": name for name, port in self.s.inbound.items()}  # as the mesh lists them
        summary.write(report, self.s.known, self.s.query_url, self.s.out, instances)

    # -- 2. dry-run ---------------------------------------------------------------------------------

    def dry_run(self, phase: Phase, observed: Span) -> list[str]:
        """The recommendations of `observed` stored as dry-run; the services of topology.ENFORCED in dry-run."""
        self.announce(phase)
        for service in topology.ENFORCED:
            self.s.commands.run("recommend", "--apply", "--service", service, "--since", _iso(observed.since),
                                "--until", _iso(observed.until), show_stderr=False)
        modes = self._modes()
        ready = [s for s in topology.ENFORCED if modes.get(s) == "dry-run"]
        if not ready:
            self.say(f"dry-run     nothing of {', '.join(topology.ENFORCED)} in dry-run: no policy to try "
                     f"(a longer --duration gives observe the calls the recommendations need)")
        span = self.spans["dry-run"] = Span.of(*self.s.hold(phase))
        for service in ready:
            self.s.commands.run("dryrun", "report", service, "--since", _iso(span.since))
        return ready

    def _modes(self) -> dict[str, str]:
        try:
            return self.s.control.modes()["modes"]
        except ControlError as e:
            self.say(f"control     {e}")
            return {}

    # -- 3. enforce ---------------------------------------------------------------------------------

    def enforce(self, phase: Phase, services: list[str]) -> Span:
        self.announce(phase)
        window = max(1, round(phase.seconds))
        interval = min(GUARD_INTERVAL_S, window / 2)
        flags = ["--window", f"{window}s"] + (["--interval", f"{interval:g}s"] if interval != GUARD_INTERVAL_S else [])
        flags += ["--min-p99-increase", GUARD_MIN_P99_INCREASE]
        if services:
            self.say(f"guard       p99 may rise by {GUARD_MIN_P99_INCREASE} before it counts: what a retry's backoff "
                     f"and second attempt add to the calls it recovers")
        guarded = []
        # payment first: inventory, whose dry-run shows its policies at work, stays in dry-run the longest (the
        # dry-run notebook, for one, reads the service with the most calls in dry-run)
        for service in reversed(services):
            done = self.s.commands.run("mode", "set", service, "enforce", "--guard", *flags, "--reason",
                                       "meshlens demo: the recommended policies, guarded")
            if done.returncode == 0:
                guarded.append(service)
        strict = self._strict_enforced(guarded)
        if strict:
            self.say(f"mTLS        STRICT enforced on {', '.join(strict)} with the switch: their recommended "
                     f"PeerAuthentication, past the readiness gate (no plaintext caller)")
        start, _ = self.s.hold(phase, until=lambda: self._guards_ended(guarded), longest=GUARD_END_MAX_S)
        end = start + phase.seconds
        if guarded:
            self.s.commands.run("mode", "guard")
            rolled_back = self._rolled_back()
            if rolled_back:  # the shoppers' "after" is enforce's: it ends where the first service left it
                service, end = min(rolled_back.items(), key=lambda kv: kv[1])
                self.say(f"enforce     ends for the figures below when {service} was rolled back, {_iso(int(end))}")
        span = self.spans["enforce"] = Span.of(start, end)
        self._before_after(span)
        self._inventory()
        return span

    def _strict_enforced(self, services: list[str]) -> list[str]:
        """Those of `services` in enforce under their own STRICT PeerAuthentication (as this demo names them)."""
        try:
            docs = {i["name"]: i["doc"] for i in self.s.control.get("PeerAuthentication")["items"]}
        except ControlError:
            return []
        modes = self._modes()
        return [s for s in services if modes.get(s) == "enforce"
                and ((docs.get(f"default/{s}") or {}).get("spec", {}).get("mtls") or {}).get("mode") == "STRICT"]

    def _inventory(self) -> None:
        from meshlens.cli.query_cmd import format_table

        by_mode = figures.inventory(self.s.query_url)
        rows = [figures.inventory_row(mode, by_mode[mode]) for mode in ("observe", "dry-run", "enforce")
                if mode in by_mode]
        for line in format_table(figures.INVENTORY_COLUMNS, rows).splitlines()[:-1]:  # without its "(n rows)"
            self.say(f"  {line}")

    def _rolled_back(self) -> dict[str, float]:
        try:
            guards = self.s.control.guards()["guards"]
        except ControlError:
            return {}
        return {g["service"]: g["ended"] for g in guards if g["outcome"] == "rolled-back" and g["ended"]}

    def _guards_ended(self, services: list[str]) -> bool:
        try:
            guards = self.s.control.guards()["guards"]
        except ControlError:
            return False
        ended = {g["service"] for g in guards if g["outcome"] != "running"}
        return set(services) <= ended

    def _before_after(self, enforced: Span) -> None:
        observed = self.spans["observe"]
        self._settled(enforced)
        before = figures.shoppers(self.s.query_url, observed)
        after = figures.shoppers(self.s.query_url, enforced)
        self.say(f"shoppers    {figures.before_after(before, after, ('observe', 'enforce'))}")
        self.say(f"            observe {observed.text()}, enforce {enforced.text()}")

    # -- 4. mTLS ------------------------------------------------------------------------------------

    def mtls(self, phase: Phase) -> Span:
        self.announce(phase)
        self.say(f"readiness   up to {READINESS_UNTIL} ago: the newest calls' spans are still on their way")
        self.s.commands.run("mtls", "readiness", "catalog", "--until", READINESS_UNTIL)
        self.s.commands.run("mtls", "readiness", "payment", "--until", READINESS_UNTIL)
        strict = ["catalog"] + ([] if self._strict_enforced(["payment"]) else ["payment"])
        path = self.s.workdir / "strict.yaml"
        path.write_text("---\n".join(STRICT.format(service=s) for s in strict))
        self.s.commands.run("apply", "-f", str(path), "--reason", f"STRICT mTLS for {' and '.join(strict)}")
        self.s.commands.run("mode", "set", "catalog", "enforce", "--reason", "STRICT mTLS for catalog")
        if self._strict_enforced(["payment"]):
            self.say(f"payment     STRICT enforced{' since its switch to enforce' if 'payment' not in strict else ''}: "
                     f"only mTLS callers are served")
        else:
            self.say(f"payment     in {self._modes().get('payment', 'observe')}, not enforce: STRICT is only noted "
                     f"on its plaintext calls (would_refuse_plaintext)")
        start = time.time()
        self.say(f"plaintext   to payment's sidecar, as a caller with no sidecar would send it: {self._plaintext_probe()}")
        _, end = self.s.hold(phase)
        span = self.spans["mTLS"] = Span.around(start, end)
        self._settled(span)
        self.say(f"identities  calls to payment, {span.text()}, as its sidecar recorded them:")
        for peer, tls, error, n in figures.identities(self.s.query_url, span, "payment"):
            self.say(f"            {n:>6,}  {'mTLS' if tls else 'plaintext':9}  {peer or '(none)'}"
                     + (f"  {error}" if error else ""))
        return span

    def _plaintext_probe(self) -> str:
        """One plaintext request to payment's inbound port, as a caller with no sidecar would send it."""
        port = self.s.inbound["payment"]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as sock:
                sock.sendall(b"POST /charge HTTP/1.1\r\nHost: payment\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n{}")
                head = sock.recv(64)
        except OSError as e:
            return f"no answer ({e.strerror or e})"
        if not head:
            return "closed with no answer (STRICT: only mTLS is served)"
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        return f"answered {status} (plaintext still served)"


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

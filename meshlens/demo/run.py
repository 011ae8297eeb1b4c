"""The demo from start to end: collector, control plane, sidecars, shop, tap, load, the phases (story.py),
cleanup."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from meshlens.collector.stores import StoreError
from meshlens.control.client import ControlClient, ControlError
from meshlens.demo import phases, topology
from meshlens.demo.commands import Commands
from meshlens.demo.phases import Phase
from meshlens.demo.progress import Progress, format_counts, observer_counts
from meshlens.demo.story import Stage, Story
from meshlens.demo.supervisor import ChildFailed, Interrupted, Supervisor, free_ports

COLLECTOR_READY = re.compile(r"meshlens collector ready otlp_http=\S+:(\d+) otlp_grpc=\S+:(\d+) query=(\S+)")
PROXY_READY = re.compile(r"meshlens proxy ready service=\S+ .*outbound=\S+:(\d+)")
PROXY_ADMIN = re.compile(r"admin=\S+:(\d+)")
CONTROL_READY = re.compile(r"meshlens control ready listen=\S+:(\d+) .*console=(\S+)")
SHOP_READY = re.compile(r"meshlens demo shop ready")
LOAD_READY = re.compile(r"meshlens demo load ready")
TAP_READY = re.compile(r"meshlens tap capturing")
# chdb's first start in a fresh directory creates the schema: slow on a busy 2-core machine.
COLLECTOR_START_S = 120.0
# The collector flushes every FLUSH_S; the demo waits until two reads of the store agree.
FLUSH_S = "0.5"
SETTLE_MAX_S = 30.0
SIDECAR_DRAIN_S = "5"
# A sidecar asks the control plane's CA for its certificate once it is up: calls before that would be plaintext
# (and the readiness gate would count them for 24 h), so the load waits for every certificate.
IDENTITY_MAX_S = 60.0
CAP_NET_RAW = 13  # linux/capability.h


@dataclass
class DemoConfig:
    """Settings of one demo run (validated by meshlens.cli.demo_cmd)."""

    duration: float
    store_path: Path
    otlp_http_port: int = 4318
    otlp_grpc_port: int = 4317
    query_port: int = 8123
    control_port: int = 15010
    rate: float = 40.0
    tap: bool = True
    keep_running: bool = False


def capture_permitted() -> tuple[bool, str]:
    """(can this process capture packets, why not)."""
    if os.geteuid() == 0:
        return True, ""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_NET_RAW & 1:
                return True, ""
    except OSError:
        pass
    return False, "capturing on lo needs root or CAP_NET_RAW"


class Demo:
    """One run; `run()` returns the exit code and always leaves no child behind."""

    def __init__(self, cfg: DemoConfig, out: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.out = out
        self.stop = threading.Event()
        self.workdir = Path(tempfile.mkdtemp(prefix="meshlens-demo-"))
        self.sup = Supervisor(self.workdir, self.stop)
        self.instances = topology.shop_instances()
        self.query_url = ""
        self.otlp_base = ""
        self.control_url = ""
        self.console_url = ""
        self.interrupted = ""
        self.admin_ports: dict[str, int] = {}
        self.plan = phases.plan(cfg.duration)
        self.clock = 0.0
        """Seconds of the phases' load so far (commands between them are not counted)."""
        self.progress: Progress | None = None

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        ok = False
        try:
            self._start()
            self._story()
            self._finish()
            ok = True
            if self.stop.is_set():  # a signal during the analysis: it finished, nothing more is started
                return 130
            if self.cfg.keep_running:
                self.say(f"\nthe collector keeps serving queries at {self.query_url}, the console at "
                         f"{self.console_url} (Ctrl-C stops them)")
                self.stop.wait()
            return 0
        except Interrupted:
            return 130
        finally:
            if self.stop.is_set() and self.interrupted:
                self.say(f"\n{self.interrupted}: stopping {len(self.sup.children)} processes")
            self.sup.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if ok or self.interrupted:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                self.say(f"logs of every process are kept in {self.workdir}")

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupted = signal.Signals(signum).name
        self.stop.set()

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _check_children(self) -> None:
        dead = self.sup.dead()
        if dead:
            c = dead[0]
            raise ChildFailed(f"{c.name} exited with {c.proc.returncode if c.proc else '?'}: "
                              f"{c.last_log_line() or 'no output'} (log {c.log_path})")

    # -- start ----------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        store = f"chdb:{cfg.store_path}"
        self.say(f"meshlens demo: store={store}")
        cfg.store_path.parent.mkdir(parents=True, exist_ok=True)
        c = self.sup.start("collector", [
            "meshlens.cli.main", "collector", "--store", store, "--spool-dir", str(self.workdir / "spool"),
            "--otlp-http-port", str(cfg.otlp_http_port), "--otlp-grpc-port", str(cfg.otlp_grpc_port),
            "--query-port", str(cfg.query_port), "--flush-interval", FLUSH_S], COLLECTOR_READY, COLLECTOR_START_S)
        assert c.ready is not None
        self.otlp_base = f"http://127.0.0.1:{c.ready.group(1)}"
        self.query_url = c.ready.group(3)
        self.say(f"collector   otlp_http={self.otlp_base} otlp_grpc=127.0.0.1:{c.ready.group(2)} "
                 f"query={self.query_url}")
        self._start_control()

        ports = free_ports(2 * len(self.instances))
        for inst, (app, inbound) in zip(self.instances, zip(ports[::2], ports[1::2])):
            inst.app_port, inst.inbound_port = app, inbound
        mesh = topology.write_mesh(self.workdir / "mesh.yaml", self.instances)
        self._apply_mesh(mesh)
        calls_url = f"{self.otlp_base}/v1/calls"
        (self.workdir / "snapshots").mkdir()

        def sidecar(name: str, service: str, extra: list[str]) -> int:
            child = self.sup.start(f"sidecar-{name}", [
                "meshlens.cli.main", "proxy", "--service", service, "--control", self.control_url,
                "--snapshot-cache", str(self.workdir / "snapshots" / f"{name}.json"), "--outbound-port", "0",
                "--admin-port", "0", "--metrics-port", "0", "--collector", calls_url,
                "--drain-timeout", SIDECAR_DRAIN_S, *extra], PROXY_READY)
            assert child.ready is not None
            admin = PROXY_ADMIN.search(child.ready.string)
            assert admin is not None
            self.admin_ports[name] = int(admin.group(1))
            return int(child.ready.group(1))

        for inst in self.instances:
            inst.outbound_port = sidecar(inst.name, inst.service, ["--app-port", str(inst.app_port),
                                                                   "--inbound-port", str(inst.inbound_port),
                                                                   "--inbound-host", "127.0.0.1"])
        ingress_out = sidecar(topology.INGRESS, topology.INGRESS, ["--inbound-port", "-1"])
        self._await_identities()
        for inst in self.instances:
            self.sup.start(f"app-{inst.name}", [
                "meshlens.demo.shop", "--service", inst.service, "--instance", inst.name,
                "--port", str(inst.app_port), "--outbound", f"http://127.0.0.1:{inst.outbound_port}",
                "--collector", self.otlp_base, *inst.shop_flags], SHOP_READY)
        names = ", ".join(f"{i.name}" for i in self.instances)
        self.say(f"shop        {names}: each behind its own sidecar, which follows the control plane and "
                 f"speaks mTLS to the others")
        self.say(f"work dir    {self.workdir}: mesh.yaml and a log per process (removed at the end)")
        self.say(f"callers     shoppers via the {topology.INGRESS} sidecar -> frontend; "
                 f"{topology.UNMESHED} (no sidecar) -> catalog, plaintext")
        self.say(f"faults      {topology.faults_text()}")
        self._start_tap(mesh, calls_url)

        self.sup.start("load-shoppers", ["meshlens.demo.load", "shoppers", "--outbound",
                                         f"http://127.0.0.1:{ingress_out}", "--rate", f"{cfg.rate:g}"], LOAD_READY)
        catalog = next(i for i in self.instances if i.service == "catalog")
        self.sup.start(f"load-{topology.UNMESHED}", [
            "meshlens.demo.load", "reports", "--target", f"http://127.0.0.1:{catalog.inbound_port}",
            "--peer", "catalog", "--collector", self.otlp_base], LOAD_READY)

    def _start_control(self) -> None:
        """The control plane: the mesh's CA, reading the calls for its gate and guards, shipping its changes."""
        c = self.sup.start("control", [
            "meshlens.cli.main", "control", "--port", str(self.cfg.control_port),
            "--store", f"sqlite:{self.workdir / 'control.db'}", "--ca-dir", str(self.workdir / "ca"),
            "--calls-store", self.query_url, "--collector", self.otlp_base], CONTROL_READY)
        assert c.ready is not None
        self.control_url = f"http://127.0.0.1:{c.ready.group(1)}"
        self.console_url = c.ready.group(2)
        self.say(f"control     {self.control_url}: the mesh, the policies and each service's mode; the mesh's CA")
        self.say(f"console     {self.console_url}")

    def _apply_mesh(self, mesh: Path) -> None:
        try:
            ControlClient(self.control_url).apply([(mesh.name, mesh.read_text())], "meshlens demo: the shop")
        except ControlError as e:
            raise ChildFailed(f"the control plane refused the shop's mesh: {e}") from None

    def _await_identities(self) -> None:
        """Until every sidecar holds its certificate (its /config says so)."""
        deadline = time.monotonic() + IDENTITY_MAX_S
        waiting = dict(self.admin_ports)
        while waiting:
            for name, port in list(waiting.items()):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as resp:
                        identity = json.loads(resp.read()).get("identity") or {}
                except (OSError, ValueError):
                    identity = {}
                if identity.get("state") == "valid":
                    del waiting[name]
            if not waiting:
                return
            self._check_children()
            if time.monotonic() > deadline:
                raise ChildFailed(f"no certificate from the control plane after {IDENTITY_MAX_S:g}s for "
                                  f"{', '.join(sorted(waiting))} (log {self.workdir / 'control.log'})")
            self._wait(0.2)

    def _start_tap(self, mesh: Path, calls_url: str) -> None:
        if not self.cfg.tap:
            self.say("wire        observer off (--no-tap)")
            return
        permitted, why = capture_permitted()
        if not permitted:
            self.say(f"wire        observer off: {why}")
            return
        bpf = " or ".join(f"tcp port {i.inbound_port}" for i in self.instances)
        try:
            self.sup.start("tap", ["meshlens.cli.main", "tap", "--iface", "lo", "--filter", bpf, "--mesh", str(mesh),
                                   "--collector", calls_url, "--tap-id", "demo/lo", "--no-progress"],
                           TAP_READY, ready_on_stderr=True)
        except ChildFailed as e:
            self.sup.stop(["tap"])
            self.say(f"wire        observer off: the tap did not start ({e})")
            return
        self.say("wire        tap on lo, the sidecars' inbound ports")

    # -- the phases -----------------------------------------------------------------------------

    def _story(self) -> None:
        cfg = self.cfg
        commands = Commands(self.sup, self.out, self.query_url, self.control_url)
        shares = ", ".join(f"{p.name} {p.seconds:.0f}s" for p in self.plan)
        self.say(f"load        {cfg.rate:g} requests/s for {cfg.duration:g}s: {shares} (Ctrl-C stops everything)")
        self.say(f"commands    run as you would, with {commands.environment()}")
        known = {i.service for i in self.instances} | {topology.INGRESS, topology.UNMESHED}
        story = Story(Stage(self.out, commands, ControlClient(self.control_url), self.query_url, self.workdir,
                            self._hold, self._wait, {i.name: i.inbound_port for i in self.instances}, known))
        observe, dry_run, enforce, mtls = self.plan
        self.progress = Progress(self.query_url, cfg.duration, self.out)
        try:
            observed = story.observe(observe)
            story.enforce(enforce, story.dry_run(dry_run, observed))
            story.mtls(mtls)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, StoreError) as e:
            raise ChildFailed(f"the store at {self.query_url} did not answer: {getattr(e, 'reason', e)}") from None

    def _hold(self, phase: Phase, until: Callable[[], bool] | None = None, longest: float = 0.0) -> tuple[float, float]:
        """The load runs for the phase's seconds (then until `until()`, at most `longest` more), with progress."""
        assert self.progress is not None
        start_wall, start = time.time(), time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - start
                if elapsed >= phase.seconds and (until is None or elapsed >= phase.seconds + longest or until()):
                    break
                self._check_children()
                if self.progress.due():
                    self.progress.show(self.clock + elapsed, phase.name)
                left = phase.seconds - elapsed
                self._wait(min(0.5, left) if left > 0 else 0.5)
            self.progress.show(self.clock + elapsed, phase.name)
        finally:
            self.progress.done()
        self.clock += elapsed
        return start_wall, time.time()

    # -- end ------------------------------------------------------------------------------------

    def _finish(self) -> None:
        self.say("")
        self.say("stopping the load, the shop and the sidecars; waiting for the collector to store the last calls")
        self.sup.stop(["load"])
        self.sup.stop(["app", "sidecar", "tap"])
        if not self.cfg.keep_running:
            self.sup.stop(["control"])
        counts = self._settle()
        self.say(f"recorded    {format_counts(counts)}")
        self._next_steps()

    def _settle(self) -> dict[str, int]:
        """Counts once two reads FLUSH_S×4 apart agree (the collector has inserted what it took)."""
        deadline = time.monotonic() + SETTLE_MAX_S
        last: dict[str, int] = {}
        while True:
            try:
                counts = observer_counts(self.query_url)
            except OSError as e:
                raise ChildFailed(f"the collector's query endpoint {self.query_url} did not answer: {e}") from None
            if counts == last or time.monotonic() > deadline:
                return counts
            last = counts
            self._wait(4 * float(FLUSH_S))

    def _reader_url(self) -> str:
        """Where readers find the store after the demo: its collector with --keep-running, else a plain one."""
        return self.query_url if self.cfg.keep_running else "http://127.0.0.1:8123/"

    def _next_steps(self) -> None:
        store = f"chdb:{self.cfg.store_path}"
        q = self._reader_url()
        if self.cfg.keep_running:
            serve = f"  the store       {self.cfg.store_path}  (served at {q} until Ctrl-C)"
        else:
            serve = (f"  the store       {self.cfg.store_path}  (the demo's collector stops now; serve the store "
                     f"again with: meshlens collector --store {store})")
        self.say("")
        self.say("where to look next")
        self.say(serve)
        sql = "SELECT observer, count() FROM calls GROUP BY observer"
        self.say(f"  query endpoint  meshlens query --store {q} \"{sql}\"")
        self.say(f"  notebooks       MESHLENS_STORE={q} jupyter lab notebooks/")
        self.say(f"  Grafana         meshlens dashboards provision --grafana-url http://127.0.0.1:3000 --store {q}")
        self.say(f"  as Istio YAML   meshlens recommend --store {q} --format yaml")
        changes = "SELECT time, who, kind, name, from_mode, to_mode, reason FROM mesh_changes FINAL ORDER BY time"
        self.say(f"  every change    meshlens query --store {q} \"{changes}\"")
        if self.cfg.keep_running:
            self.say(f"  the console     {self.console_url}  (until Ctrl-C)")
            self.say(f"  its history     meshlens history --control {self.control_url}")

"""Child processes of the demo: started until their ready line, stopped as process groups, never left behind.

Each child runs in its own process group (so a terminal's Ctrl-C reaches only
the demo, which then stops the children in order) and asks the kernel for
SIGTERM when the demo dies (PR_SET_PDEATHSIG), so even `kill -9` of the demo
leaves nothing running.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("meshlens.demo")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Time a child gets between SIGTERM and SIGKILL: sidecars and the collector drain and flush in this.
STOP_TIMEOUT = 15.0
# A command the demo runs to its end (`meshlens recommend --apply`, ...): seconds of work on a busy machine.
COMMAND_TIMEOUT = 120.0


class ChildFailed(RuntimeError):
    """A child exited or never printed its ready line; the message names it and its last log line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the demo waited."""


def _child_setup() -> None:
    """In the child before exec: die with the parent (Linux), ignore the terminal's Ctrl-C group signal."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the process group still covers it
        pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free right now, from below the kernel's ephemeral range.

    They are bound later, by children started one after another; meanwhile every other
    child binds port 0 (a sidecar's admin port, a client's source port), which the kernel
    takes from `ip_local_port_range`. A port picked from inside that range could be handed
    out again before its owner binds it (it happened: an admin port took a shop's port);
    below the range only an explicit bind can take it."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 8192), low))
    random.shuffle(candidates)
    socks: list[socket.socket] = []
    try:
        for port in candidates:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the range (an odd sysctl): the kernel's choice
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@dataclass(frozen=True)
class Finished:
    """A command run to its end: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class Child:
    """One supervised process: its name, command, log file, and the process once started."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    ready: re.Match[str] | None = None
    _log: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""


class Supervisor:
    """Starts children, watches them, and stops every one of them (reverse start order) exactly once."""

    def __init__(self, workdir: Path, stop: threading.Event) -> None:
        self.workdir = workdir
        self.stop_event = stop
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], ready: re.Pattern[str], timeout: float = 60.0,
              env: dict[str, str] | None = None, ready_on_stderr: bool = False) -> Child:
        """Run `python -m ARGS` until a stdout (or stderr) line matches `ready`; the rest goes to a log file."""
        child = Child(name, [sys.executable, "-m", *args], self.workdir / f"{name}.log")
        child._log = open(child.log_path, "ab")
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=child._log, env=self._env(env), process_group=0,
                                      preexec_fn=_child_setup, close_fds=True)
        self.children.append(child)
        log.debug("started name=%s pid=%d", name, child.pid)
        if ready_on_stderr:
            threading.Thread(target=self._drain, args=(child,), daemon=True, name=f"drain-{name}").start()
            child.ready = self._await_log(child, ready, timeout)
            return child
        child.ready = self._await_ready(child, ready, timeout)
        threading.Thread(target=self._drain, args=(child,), daemon=True, name=f"drain-{name}").start()
        return child

    def _await_ready(self, child: Child, ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        assert child.proc is not None and child.proc.stdout is not None
        deadline = time.monotonic() + timeout
        out = child.proc.stdout
        while time.monotonic() < deadline:
            if self.stop_event.is_set():
                raise Interrupted()
            readable, _, _ = select.select([out], [], [], 0.2)
            if readable:
                line = out.readline()
                if line:
                    text = line.decode(errors="replace")
                    child._log.write(line)  # type: ignore[attr-defined]
                    m = ready.search(text)
                    if m:
                        return m
                    continue
            if child.proc.poll() is not None:
                raise ChildFailed(f"{child.name} exited with {child.proc.returncode} before it was ready: "
                                  f"{child.last_log_line() or 'no output'} (log {child.log_path})")
        raise ChildFailed(f"{child.name} was not ready after {timeout:g}s (log {child.log_path})")

    def _await_log(self, child: Child, ready: re.Pattern[str], timeout: float) -> re.Match[str]:
        assert child.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stop_event.wait(0.2):
                raise Interrupted()
            m = ready.search(child.log_path.read_text(errors="replace"))
            if m:
                return m
            if child.proc.poll() is not None:
                raise ChildFailed(f"{child.name} exited with {child.proc.returncode} before it was ready: "
                                  f"{child.last_log_line() or 'no output'} (log {child.log_path})")
        raise ChildFailed(f"{child.name} was not ready after {timeout:g}s (log {child.log_path})")

    @staticmethod
    def _drain(child: Child) -> None:
        """Copy what the child prints after its ready line into its log, so a full pipe never blocks it."""
        assert child.proc is not None and child.proc.stdout is not None
        try:
            for line in child.proc.stdout:
                child._log.write(line)  # type: ignore[attr-defined]
                child._log.flush()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            pass

    def run(self, name: str, args: list[str], timeout: float = COMMAND_TIMEOUT,
            env: dict[str, str] | None = None) -> Finished:
        """Run `python -m ARGS` to its end, as a child like the others (its own group, dies with the demo, stopped
        by `stop()`); Interrupted when the stop event is set first, ChildFailed past `timeout`."""
        out_path = self.workdir / f"{name}.out"
        child = Child(name, [sys.executable, "-m", *args], self.workdir / f"{name}.log")
        child._log = open(child.log_path, "wb")  # its stderr
        with open(out_path, "wb") as out:
            child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=child._log,
                                          env=self._env(env), process_group=0, preexec_fn=_child_setup,
                                          close_fds=True)
        self.children.append(child)
        log.debug("started name=%s pid=%d", name, child.pid)
        deadline = time.monotonic() + timeout
        try:
            while child.proc.poll() is None:
                if self.stop_event.wait(0.1):
                    raise Interrupted()
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{name} did not finish in {timeout:g}s (log {child.log_path})")
        finally:
            self.stop([name])
        return Finished(child.proc.returncode, out_path.read_text(errors="replace"),
                        child.log_path.read_text(errors="replace"))

    @staticmethod
    def _env(extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHLENS_", "OTEL_"))}
        env.update(extra or {})
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def dead(self) -> list[Child]:
        """Children that exited on their own (commands run to their end are not children any more)."""
        return [c for c in self.children if c.proc is not None and c.proc.poll() is not None]

    def stop(self, names: list[str] | None = None, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the named children (all when None) together, wait for them, SIGKILL what is left."""
        chosen = [c for c in reversed(self.children) if names is None or c.name in names or
                  any(c.name.startswith(n + "-") for n in names)]
        for c in chosen:
            _signal_group(c, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in chosen:
            assert c.proc is not None
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child did not stop name=%s pid=%d: killed", c.name, c.pid)
            _signal_group(c, signal.SIGKILL)  # stragglers in its group, and the child itself if it hung
            c.proc.wait()
            if c.proc.stdout is not None:
                try:
                    c.proc.stdout.close()
                except OSError:
                    pass
            c._log.close()  # type: ignore[attr-defined]
        self.children = [c for c in self.children if c not in chosen]

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]


def _signal_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

"""Guarded enforcement: a switch to enforce that switches itself back to dry-run when it made things worse.

`PUT /v1/modes/S {"mode": "enforce", "guard": {...}}` (`meshlens mode set S enforce --guard`).
Flagger's analysis loop, for a mesh policy instead of a deployment: every `interval` the
calls to S in enforce since the switch are compared with its calls in dry-run over the
`window` before it (the baseline), as S's callers saw them (analysis/mode_figures.py: one
observer per edge, caller first; a retried exchange is one call with its final result).

- Start: S must be in dry-run, the control plane must read recorded calls
  (`--calls-store`), and the baseline must hold at least `min_calls`; else 409 in one
  line, nothing changed. The `Guard` resource (named for S, written by the control plane
  only, in no sidecar's snapshot) is stored in the same change as the Mode, so a control
  plane restarted mid-guard resumes it, and any replica over etcd runs it.
- Judged once enforce has `min_calls` (`judge`). A breach rolls back: Mode dry-run and the
  Guard's outcome in one change, audited as `meshlens-guard` with a reason `guard: ...`
  giving the figures; the sidecars get it as any mode change (their snapshot), and
  mesh_changes gets it as any change (control/changes.py).
- The window over without a breach: `passed`, audited; the mode stays enforce. Over with
  fewer than `min_calls` in enforce: `inconclusive`, audited, and the mode stays enforce: the
  guard undoes a decision only on evidence that it hurt, and a service with too few calls to
  judge had too few callers to hurt; the outcome says it went unjudged. The window's last
  calls reach the store late, so it is judged SETTLE_S after its end.
- The mode switched by hand (PUT /v1/modes: in the same change; an apply or a delete: at
  the next check) ends it `cancelled`. A calls store that cannot be read is retried at every
  interval and said in the status; missing figures never roll anything back.

What the guard last read is kept in memory (`GET /v1/guards`), not in the store: every
stored change moves the revision each sidecar's snapshot is versioned by. So a guard
writes twice: with its switch, and with its outcome.

An outcome is written only if the stored Guard is still the one judged, and a rollback only
if the Mode is still the enforce it read: a compare-and-set (`Store.put`'s `expect`, one
SQLite transaction or one etcd transaction comparing both revisions), so that two replicas
judging at the same moment write one outcome, and a hand switch in between is never undone.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from meshlens.analysis.mode_figures import Figures
from meshlens.control.store import Change, Stale, Store, StoreUnavailable
from meshlens.policy.resources import Resource, mode_resource
from meshlens.policy.spec import duration_s

__all__ = ["KIND", "SETTLE_S", "WHO", "CallsUnreadable", "GuardError", "GuardRefused", "GuardRunner",
           "Settings", "begin", "judge", "read_settings", "rule", "status"]

log = logging.getLogger("meshlens.control")

KIND = "Guard"
WHO = "meshlens-guard"
# The calls of a window's last seconds reach the store a second or two after they are made (the sidecars'
# recorders batch them, the collector flushes about once a second): a window is judged this long after its end.
SETTLE_S = 5.0
# With no guard due the loop looks at the store this often: a guard started through another replica (etcd) is
# taken up within it; one started through this one wakes it at once.
IDLE_S = 5.0


class GuardError(ValueError):
    """A guard's settings that cannot be used (400), in one line."""


class GuardRefused(Exception):
    """A guard that cannot start now (409): what is missing, in one line."""


class CallsUnreadable(Exception):
    """The calls store did not answer (503 at the start; retried while a guard runs)."""


@dataclass(frozen=True)
class Settings:
    """What a guard watches for and how long. Names as Flagger and Argo Rollouts have them where they have one
    (`interval`); the bounds are relative to the baseline, as Kayenta's canary judge compares."""

    window_s: float = 300.0
    """How long enforce is watched, and how far back the baseline is read."""
    interval_s: float = 5.0
    """How often the figures are read."""
    min_calls: int = 100
    """Calls needed in each mode to judge (fewer: the baseline is refused, the enforce figures wait)."""
    max_error_increase_pp: float = 1.0
    """Percentage points of error rate over the baseline's that enforce may add."""
    max_p99_ratio: float = 1.5
    """How many times the baseline's p99 enforce's may be ..."""
    min_p99_increase_ms: float = 5.0
    """... and by how much at least, so that a fast service's jitter does not roll back."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = ("window", "interval", "min_calls", "max_error_increase", "max_p99_ratio", "min_p99_increase")
_EXAMPLE = ('{"window": "5m", "interval": "5s", "min_calls": 100, "max_error_increase": 1, "max_p99_ratio": 1.5, '
            '"min_p99_increase": "5ms"}')


def read_settings(body: Any) -> Settings:
    """The `guard` of a PUT /v1/modes body (every field optional), checked; GuardError in one line."""
    if not isinstance(body, dict):
        raise GuardError(f"guard must be a JSON object, e.g. {_EXAMPLE} (every field optional)")
    unknown = sorted(str(k) for k in set(body) - set(_FIELDS))
    if unknown:
        raise GuardError(f"guard: unknown field(s) {', '.join(repr(k)[:60] for k in unknown[:5])} "
                         f"(known: {', '.join(_FIELDS)})")
    d = Settings()
    window = _duration(body, "window", d.window_s, 1.0, 86400.0, "1s to 24h")
    interval = _duration(body, "interval", d.interval_s, 0.1, 300.0, "100ms to 5m")
    if interval > window:
        raise GuardError(f"guard.interval ({span(interval)}) must be at most the window ({span(window)})")
    min_calls = body.get("min_calls", d.min_calls)
    if isinstance(min_calls, bool) or not isinstance(min_calls, int) or not 10 <= min_calls <= 1_000_000:
        raise GuardError(f"guard.min_calls must be a whole number from 10 to 1000000, not {_shown(min_calls)}")
    return Settings(window, interval, min_calls,
                    _number(body, "max_error_increase", d.max_error_increase_pp, 0.0, 100.0, "percentage points"),
                    _number(body, "max_p99_ratio", d.max_p99_ratio, 1.0, 100.0, "times the baseline's p99"),
                    _duration(body, "min_p99_increase", d.min_p99_increase_ms / 1000, 0.0, 60.0, "0s to 1m") * 1000)


def _duration(body: dict[str, Any], key: str, default: float, lo: float, hi: float, bounds: str) -> float:
    if key not in body:
        return default
    try:
        seconds = duration_s(body[key])
    except ValueError as e:
        raise GuardError(f"guard.{key}: {str(e)[:200]}") from None
    if not lo <= seconds <= hi:
        raise GuardError(f"guard.{key} must be {bounds}, not {_shown(body[key])}")
    return seconds


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, unit: str) -> float:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise GuardError(f"guard.{key} must be a number from {lo:g} to {hi:g} ({unit}), not {_shown(v)}")
    return float(v)


def _shown(v: Any) -> str:
    return repr(v)[:60]


# -- judging: pure ------------------------------------------------------------------------------------------

def judge(base: Figures, now: Figures, s: Settings) -> str | None:
    """What enforce made worse beyond the bounds, in words (the rollback's reason), or None.

    The error rate: more than `max_error_increase_pp` over the baseline's, and enforce's 95% interval wholly
    above the baseline's. The figures are looked at every interval, and a point estimate tested that often
    against a fixed line crosses it by chance sooner or later; two 95% intervals apart are rare by chance at
    any one look. The percentage points keep a significant but trifling increase on a busy service from
    rolling back. p99: more than `max_p99_ratio` times the baseline's, and by `min_p99_increase_ms` at least.
    Both compare calls as callers saw them: a retried exchange counts once, with its final result."""
    base_hi = base.error_interval()[1]
    now_lo = now.error_interval()[0]
    if now.error_rate - base.error_rate > s.max_error_increase_pp / 100 and now_lo > base_hi:
        return (f"error rate {_pct(now.error_rate)} (n={now.n:,}) in enforce against {_pct(base.error_rate)} "
                f"(n={base.n:,}) in dry-run, beyond +{s.max_error_increase_pp:g}pp and dry-run's 95% interval "
                f"(up to {_pct(base_hi)})")
    if now.p99_s > s.max_p99_ratio * base.p99_s and now.p99_s - base.p99_s >= s.min_p99_increase_ms / 1000:
        return (f"p99 {_ms(now.p99_s)} (n={now.n:,}) in enforce against {_ms(base.p99_s)} (n={base.n:,}) in dry-run, "
                f"beyond {s.max_p99_ratio:g}x and +{s.min_p99_increase_ms:g} ms")
    return None


def rule(base: Figures, s: Settings) -> str:
    """What will roll a guard back, in words, with the baseline's figures in."""
    lo, hi = base.error_interval()
    p99 = max(s.max_p99_ratio * base.p99_s, base.p99_s + s.min_p99_increase_ms / 1000)
    return (f"with at least {s.min_calls:,} calls in enforce: an error rate above "
            f"{_pct(base.error_rate + s.max_error_increase_pp / 100)} (+{s.max_error_increase_pp:g}pp) with its 95% "
            f"interval above dry-run's (up to {_pct(hi)}), or p99 above {_ms(p99)} ({s.max_p99_ratio:g}x, and at least "
            f"+{s.min_p99_increase_ms:g} ms)")


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def span(seconds: float) -> str:
    """A duration as people write one: 5m, 1h30m, 10s, 0.5s."""
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)


def _calls(n: int) -> str:
    return f"{n:,} call{'s' if n != 1 else ''}"


# -- the document ------------------------------------------------------------------------------------------

def figures(d: dict[str, Any]) -> Figures:
    return Figures(d["mode"], d["n"], d["failed"], d["p50_s"], d["p99_s"])


def _resource(spec: dict[str, Any]) -> Resource:
    name = spec["service"]
    return Resource(KIND, name, {"apiVersion": "meshlens.io/v1alpha1", "kind": KIND, "metadata": {"name": name},
                                 "spec": spec})


def _ended(res: Resource, outcome: str, why: str, enforce: Figures | None) -> Resource:
    spec = {**res.doc["spec"], "outcome": outcome, "why": why, "ended": time.time(),
            "enforce": enforce.as_dict() if enforce is not None else res.doc["spec"]["enforce"]}
    return _resource(spec)


def status(res: Resource, progress: Progress | None, now: float) -> dict[str, Any]:
    """A guard as `GET /v1/guards` shows it: its settings, the baseline, the last figures, the time left, the end."""
    spec = res.doc["spec"]
    s = Settings(**spec["settings"])
    running = spec["outcome"] == "running"
    ends = spec["started"] + s.window_s
    enforce = spec["enforce"]
    if running and progress is not None and progress.enforce is not None:
        enforce = progress.enforce.as_dict()
    return {"service": spec["service"], "revision": res.revision, "outcome": spec["outcome"], "why": spec["why"],
            "who": spec["who"], "reason": spec["reason"], "started": spec["started"], "ends": ends,
            "ended": spec["ended"], "window": span(s.window_s), "time_left_s": max(0.0, ends - now) if running else 0.0,
            "settings": spec["settings"], "baseline": spec["baseline"], "enforce": enforce,
            "baseline_text": figures(spec["baseline"]).text(),
            "enforce_text": figures(enforce).text() if enforce is not None and enforce["n"] else None,
            "needs_calls": max(0, s.min_calls - (enforce["n"] if enforce is not None else 0)) if running else 0,
            "checked_at": progress.checked_at if progress is not None and progress.checked_at else None,
            "error": progress.error if progress is not None and running else "",
            "rolls_back_if": rule(figures(spec["baseline"]), s)}


# -- reading the calls -----------------------------------------------------------------------------------

def read_figures(url: str, service: str, since: float, until: float) -> dict[str, Figures]:
    """Figures of the calls to `service` in [since, until) per mode (none: {}); CallsUnreadable in one line.
    Blocking: run it in a thread."""
    from meshlens.analysis.mode_figures import by_mode
    from meshlens.analysis.scope import NoData, UnknownService, open_scope
    from meshlens.analysis.window import Window
    from meshlens.collector.stores import StoreError, connect

    utc = dt.timezone.utc
    window = Window(dt.datetime.fromtimestamp(since, utc), dt.datetime.fromtimestamp(until, utc))
    try:
        store = connect(url)
    except (ValueError, StoreError) as e:
        raise CallsUnreadable(f"cannot read the calls at {url}: {e}") from None
    try:
        store.use_database()
        return by_mode(open_scope(store, window, service), service)
    except (NoData, UnknownService):
        return {}
    except StoreError as e:
        said = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise CallsUnreadable(f"cannot read the calls at {url}: {said}") from None
    finally:
        store.close()


async def mode_of(store: Store, service: str) -> str:
    res = await store.get("Mode", service)
    return res.doc["spec"]["mode"] if res is not None else "observe"  # a service nobody switched is observed


async def begin(store: Store, calls_store: str | None, service: str, s: Settings, change: Change) -> Resource:
    """The Guard to store with the switch to enforce, its baseline read; GuardRefused or CallsUnreadable."""
    if not calls_store:
        raise GuardRefused("a guard judges recorded calls, and this control plane reads none (start it with "
                           "--calls-store URL); nothing changed")
    mode = await mode_of(store, service)
    if mode != "dry-run":
        raise GuardRefused(f"{service} is in {mode}, not dry-run: a guard judges enforce against the calls of "
                           f"dry-run (meshlens mode set {service} dry-run first); nothing changed")
    now = time.time()
    base = (await asyncio.to_thread(read_figures, calls_store, service, now - s.window_s, now)).get("dry-run")
    n = base.n if base is not None else 0
    if base is None or n < s.min_calls:
        raise GuardRefused(f"{service}: {_calls(n)} in dry-run in the last {span(s.window_s)}, a guard needs "
                           f"{s.min_calls:,} to judge; leave it in dry-run longer; nothing changed")
    return _resource({"service": service, "started": time.time(), "settings": s.as_dict(), "baseline": base.as_dict(),
                      "who": change.who, "reason": change.reason, "outcome": "running", "why": "", "enforce": None,
                      "ended": None})


# -- the loop --------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """What this replica last read of one guard (kept in memory: see the module's docstring)."""

    checked_at: float = 0.0
    enforce: Figures | None = None
    error: str = ""
    """Why the calls could not be read at the last check ('' when they were)."""


class GuardRunner:
    """Every running guard in the store, checked each its interval, in one task of the control plane's loop."""

    def __init__(self, store: Store, calls_store: str | None) -> None:
        self.store = store
        self.calls_store = calls_store
        self.progress: dict[tuple[str, float], Progress] = {}
        """By (service, started): a guard started again is another."""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """Look at the store now (a guard was started or ended here)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def progress_of(self, res: Resource) -> Progress | None:
        return self.progress.get((res.name, res.doc["spec"]["started"]))

    async def ended_by_hand(self, service: str, mode: str, change: Change) -> list[Resource]:
        """The running guard's end, to store with a hand switch of its mode to `mode` (none if it stays enforce)."""
        res = await self.store.get(KIND, service)
        if res is None or res.doc["spec"]["outcome"] != "running" or mode == "enforce":
            return []
        p = self.progress_of(res)
        return [_ended(res, "cancelled", f"guard: cancelled: {service} set to {mode} by {change.who}",
                       p.enforce if p is not None else None)]

    async def _run(self) -> None:
        while True:
            wait = IDLE_S
            self._wake.clear()  # here, not before the sleep: a wake() during the checks is not lost
            try:
                now = time.time()
                running = [r for r in await self.store.list(KIND) if r.doc["spec"]["outcome"] == "running"]
                keys = {(r.name, r.doc["spec"]["started"]) for r in running}
                self.progress = {k: v for k, v in self.progress.items() if k in keys}  # an ended one's is stored
                for res in running:
                    p = self.progress.setdefault((res.name, res.doc["spec"]["started"]), Progress())
                    interval = res.doc["spec"]["settings"]["interval_s"]
                    if now - p.checked_at >= interval:
                        await self._check(res, p)
                        now = time.time()
                    wait = min(wait, max(0.05, p.checked_at + interval - now))
                await self._sleep(wait)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as e:
                log.warning("guards: store unavailable error=%s", e)
                await asyncio.sleep(1.0)
            except Exception:  # a bug here must not end every guard: said loudly, tried again
                log.exception("guards: check failed")
                await asyncio.sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass or `wake()`. Not Store.wait: on Python 3.11 a wait_for that completes as it is
        cancelled swallows the cancellation, and the control plane would not stop."""
        timer = asyncio.get_running_loop().call_later(seconds, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()

    async def _check(self, res: Resource, p: Progress) -> None:
        spec = res.doc["spec"]
        service, s, base = spec["service"], Settings(**spec["settings"]), figures(spec["baseline"])
        p.checked_at = time.time()
        mode = await mode_of(self.store, service)
        if mode != "enforce":
            await self._end(res, "cancelled", f"guard: cancelled: the mode of {service} is {mode} now, not enforce",
                            p.enforce)
            return
        if not self.calls_store:
            p.error = "this control plane reads no calls (start it with --calls-store URL): nothing is judged"
            return
        end = spec["started"] + s.window_s
        try:
            got = await asyncio.to_thread(read_figures, self.calls_store, service, spec["started"],
                                          min(p.checked_at, end))
        except CallsUnreadable as e:
            if p.error != str(e):
                log.warning("guard cannot read the calls service=%s error=%s", service, e)
            p.error = str(e)
            return
        if p.error:
            log.info("guard reads the calls again service=%s", service)
        p.error = ""
        enforce = p.enforce = got.get("enforce") or Figures("enforce", 0, 0, 0.0, 0.0)
        breach = judge(base, enforce, s) if enforce.n >= s.min_calls else None
        if breach is not None:
            await self._end(res, "rolled-back", f"guard: {breach}; back to dry-run", enforce)
        elif p.checked_at >= end + SETTLE_S:
            if enforce.n >= s.min_calls:
                await self._end(res, "passed", f"guard: passed: error rate {_pct(enforce.error_rate)} "
                                f"(n={enforce.n:,}) in enforce against {_pct(base.error_rate)} (n={base.n:,}) in "
                                f"dry-run, p99 {_ms(enforce.p99_s)} against {_ms(base.p99_s)}, within the bounds for "
                                f"{span(s.window_s)}; stays enforce", enforce)
            else:
                await self._end(res, "inconclusive", f"guard: inconclusive: {_calls(enforce.n)} in enforce in "
                                f"{span(s.window_s)}, {s.min_calls:,} needed to judge; stays enforce, unjudged",
                                enforce)

    async def _end(self, judged: Resource, outcome: str, why: str, enforce: Figures | None) -> None:
        """Store the outcome (with the rollback), if the Guard judged is still the one stored and running."""
        service = judged.name
        res = await self.store.get(KIND, service)
        if res is None or res.revision != judged.revision:
            return  # ended or started again meanwhile (a hand switch, another replica)
        resources = [_ended(res, outcome, why, enforce)]
        expect = {(KIND, service): res.revision}
        if outcome == "rolled-back":
            stored_mode = await self.store.get("Mode", service)
            mode = stored_mode.doc["spec"]["mode"] if stored_mode is not None else "observe"
            if mode != "enforce":
                why = f"guard: cancelled: the mode of {service} is {mode} now, not enforce"
                resources = [_ended(res, "cancelled", why, enforce)]
            else:
                resources.insert(0, mode_resource(service, "dry-run"))
                expect[("Mode", service)] = stored_mode.revision
        try:
            await self.store.put(resources, Change(WHO, why), expect)
        except Stale:
            return  # ended, switched or judged meanwhile (a hand switch, another replica): nothing written
        level = logging.WARNING if outcome == "rolled-back" else logging.INFO
        log.log(level, "guard ended service=%s outcome=%s why=%s", service, resources[-1].doc["spec"]["outcome"], why)

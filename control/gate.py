"""The readiness gate: a change that would make a service enforce STRICT mTLS while it still has plaintext
callers is refused, naming them, unless forced.

A change (an apply, a mode set) is checked against what would be stored after it: every
service that would then be in `enforce` under a STRICT PeerAuthentication (Istio's
precedence: meshlens.policy.security.peer_authentication), and was not before, is looked up
in the recorded calls of the last GATE_WINDOW (analysis/mtls.py `readiness`, the same
reading `meshlens mtls readiness` gives). Callers that sent plaintext there would be refused
by STRICT: the change is refused with their names, counts and when last seen. Putting the
service in dry-run first shows the same callers as `would_refuse_plaintext` rows.
A change can be forced (`--force`), and is refused when the calls cannot be read (say so
rather than guess), so that turning STRICT on never breaks a caller by surprise.

The calls are read from `calls_store` (`meshlens control --calls-store URL`: a collector's
query endpoint, ClickHouse, or MESHLENS_STORE), never from the embedded directory directly
(only the collector opens it).
"""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from meshlens.mesh import MeshError, parse
from meshlens.policy.security import peer_authentication

__all__ = ["GATE_WINDOW_S", "GateRefused", "strict_now"]

GATE_WINDOW_S = 24 * 3600  # a daily caller (a batch, a cron job) is in the last 24 h


class GateRefused(Exception):
    """The change would break callers (or that cannot be known); one line."""


def strict_now(resources: list[Any]) -> set[str]:
    """Services that these resources (everything stored after a change) put in enforce under STRICT."""
    mesh = next((r for r in resources if r.kind == "Mesh"), None)
    if mesh is None:
        return set()
    try:
        services = parse(mesh.doc["spec"]).services
    except MeshError:
        return set()
    modes = {r.name: r.doc["spec"]["mode"] for r in resources if r.kind == "Mode"}
    peer = [(r.name, r.doc) for r in resources if r.kind == "PeerAuthentication"]
    out = set()
    for name, svc in services.items():
        if modes.get(name) != "enforce":
            continue
        labels = {"app": name}
        for inst in svc.instances:
            labels.update(inst.labels)
        mode, ports = peer_authentication(peer, svc.namespace, labels)
        if mode == "STRICT" or "STRICT" in ports.values():
            out.add(name)
    return out


async def check(before: list[Any], after: list[Any], calls_store: str | None, force: bool) -> None:
    """Refuse (GateRefused) a change that turns STRICT on, enforced, for a service with plaintext callers."""
    newly = sorted(strict_now(after) - strict_now(before))
    if not newly or force:
        return
    if not calls_store:
        raise GateRefused(f"STRICT mTLS would be enforced on {', '.join(newly)}, and who still calls in plaintext "
                          f"cannot be checked (no calls store: meshlens control --calls-store URL); put it in dry-run "
                          f"first, or apply with --force")
    breaking = await asyncio.to_thread(_plaintext_callers, calls_store, newly)
    if breaking:
        said = "; ".join(f"{svc}: {', '.join(callers)}" for svc, callers in breaking.items())
        raise GateRefused(f"STRICT mTLS would refuse plaintext callers of the last {GATE_WINDOW_S // 3600} h: {said} "
                          f"(meshlens mtls readiness {' '.join(breaking)}); put them on mTLS first, try STRICT in "
                          f"dry-run, or apply with --force")


def _plaintext_callers(url: str, services: list[str]) -> dict[str, list[str]]:
    from meshlens.analysis.mtls import readiness
    from meshlens.analysis.scope import NoData, UnknownService, open_scope
    from meshlens.analysis.window import Window
    from meshlens.collector.stores import StoreError, connect

    try:
        store = connect(url)
    except (ValueError, StoreError) as e:
        raise GateRefused(f"cannot read the calls at {url} to check who would break ({e}); apply with --force "
                          f"to go ahead unchecked") from None
    out: dict[str, list[str]] = {}
    try:
        store.use_database()
        for svc in services:
            try:
                found = readiness(open_scope(store, Window.last(dt.timedelta(seconds=GATE_WINDOW_S)), svc))
            except (NoData, UnknownService):
                continue  # no calls to it in the window: nobody to break
            for r in found:
                if r.service == svc and r.would_break:
                    out[svc] = [f"{c['caller']} ({c['plaintext']} plaintext calls, last {c['last_plaintext']})"
                                for c in r.callers if c["plaintext"]]
    except StoreError as e:
        raise GateRefused(f"cannot read the calls at {url} to check who would break ({e}); apply with --force "
                          f"to go ahead unchecked") from None
    finally:
        store.close()
    return out

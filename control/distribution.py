"""What each sidecar gets from the control plane, and what each said back (as Envoy's xDS does it, simply).

A sidecar long-polls `GET /v1/snapshot?service=S&instance=I&version=V`: it is answered
at once with a full snapshot when the store's revision is not V, else when the revision
moves, else 304 after the wait it asked for. A snapshot holds what a sidecar needs:
the mesh, every service's mode, the policies (every VirtualService, DestinationRule,
PeerAuthentication, AuthorizationPolicy and LocalRateLimit), and the CA's trust
(control/rotation.py). Its version is the store
revision it was built at: anything stored changes it, so a sidecar never keeps a stale
one. The snapshot is sent whatever it holds; the sidecar validates it and reports ACK
or NACK with its error (`POST /v1/status`), and `GET /v1/status` lists every sidecar
that polled: the version it applied, its last ACK or NACK, the mode it applies, when it
was last seen. That list lives in the control plane's memory (a restarted control
plane relearns it within one poll); what sidecars applied is kept by each of them on
disk (proxy/control.py).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from meshlens.control.store import Store

__all__ = ["POLICY_KINDS", "Sidecars", "Snapshots", "snapshot"]

POLICY_KINDS = ("VirtualService", "DestinationRule", "PeerAuthentication", "AuthorizationPolicy", "LocalRateLimit")
# Sidecars remembered at most (the oldest seen is forgotten first): 10x the 1,000 watching.
MAX_SIDECARS = 10_000


async def snapshot(store: Store) -> dict[str, Any]:
    """The full configuration at the current revision, as every sidecar gets it."""
    version, everything = await store.everything()
    by_kind: dict[str, list[Any]] = {}
    for r in everything:
        by_kind.setdefault(r.kind, []).append(r)
    mesh = next(iter(by_kind.get("Mesh", [])), None)
    modes = {r.name: r.doc["spec"]["mode"] for r in by_kind.get("Mode", [])}
    policies = [r.doc for kind in POLICY_KINDS for r in by_kind.get(kind, [])]
    trust = next(iter(by_kind.get("TrustBundle", [])), None)  # control/rotation.py
    return {"version": str(version), "mesh": mesh.doc["spec"] if mesh else {"services": {}}, "modes": modes,
            "policies": policies, "trust": trust.doc["spec"] if trust else None}


class Snapshots:
    """The snapshot at the current revision, built and encoded once however many sidecars ask for it
    (bench/control.py: 1,000 watchers woken by one switch cost 500 ms of CPU when each got its own)."""

    def __init__(self) -> None:
        self._revision = -1
        self._body = b""
        self._lock = asyncio.Lock()

    async def body(self, store: Store) -> bytes:
        revision = await store.revision()
        if revision == self._revision:
            return self._body
        async with self._lock:  # the first of a thousand woken builds it; the rest find it
            if revision != self._revision:
                snap = await snapshot(store)
                self._body = json.dumps(snap, separators=(",", ":")).encode()
                self._revision = int(snap["version"])
            return self._body


@dataclass
class Sidecar:
    """One sidecar instance as the control plane last heard of it."""

    service: str
    instance: str
    polled_version: str = ""
    """The version it said it had when it last polled."""
    applied_version: str = ""
    """The last version it ACKed."""
    state: str = "polling"
    """polling (no report yet), ACK or NACK."""
    error: str = ""
    mode: str = ""
    """The mode it says it applies."""
    certificate_root: str = ""
    """The fingerprint of the root its certificate chains to ('' without one), as its last poll said."""
    trusts: tuple[str, ...] = ()
    """The fingerprints of the roots it trusts."""
    last_seen: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "instance": self.instance, "polled_version": self.polled_version,
                "applied_version": self.applied_version, "state": self.state, "error": self.error,
                "mode": self.mode, "certificate_root": self.certificate_root, "trusts": list(self.trusts),
                "last_seen": self.last_seen}


class Sidecars:
    """Every sidecar heard of, by instance (per control-plane process)."""

    def __init__(self) -> None:
        self.by_instance: dict[str, Sidecar] = {}

    def polled(self, service: str, instance: str, version: str, root: str = "", trusts: tuple[str, ...] = ()) -> None:
        s = self._get(service, instance)
        s.polled_version, s.certificate_root, s.trusts, s.last_seen = version, root, trusts, time.time()

    def reported(self, service: str, instance: str, version: str, ack: bool, error: str, mode: str) -> None:
        s = self._get(service, instance)
        s.state, s.error, s.mode, s.last_seen = ("ACK" if ack else "NACK"), error, mode, time.time()
        if ack:
            s.applied_version = version

    def certified(self, service: str, instance: str, root: str, trusts: tuple[str, ...]) -> None:
        """A certificate issued to it: what it holds from now on."""
        s = self._get(service, instance)
        s.certificate_root, s.trusts, s.last_seen = root, trusts, time.time()

    def _get(self, service: str, instance: str) -> Sidecar:
        s = self.by_instance.get(instance)
        if s is None or s.service != service:
            if len(self.by_instance) >= MAX_SIDECARS:
                oldest = min(self.by_instance.values(), key=lambda x: x.last_seen)
                del self.by_instance[oldest.instance]
            s = self.by_instance[instance] = Sidecar(service, instance)
        return s

    def listed(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in sorted(self.by_instance.values(), key=lambda x: (x.service, x.instance))]

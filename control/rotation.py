"""The trust sidecars are told of, and the root rotation's gate: which sidecars are ready for its next step.

The CA's trust (control/ca.py `CA.trust`: every root, the one that signs, where a rotation
stands) is stored as the `TrustBundle` resource, written by the control plane only: at
start when it differs from the stored one, and at each rotation step, audited as any
change. It is in every snapshot (control/distribution.py), so a sidecar gets a new root
with its next poll, rebuilds its contexts with it, and renews at once when the signer is
not the root its certificate chains to (proxy/control.py `IdentityWatch`).

Each poll carries what the sidecar holds (`root`: the fingerprint of its certificate's
root; `trusts`: the roots it trusts), kept with the sidecar in control/distribution.py
`Sidecars`. A step that would break a sidecar is refused (409, naming them) unless forced:

- `switch` while a sidecar does not yet trust the new root: its peers' new certificates
  would be refused by it;
- `finish` while a sidecar still holds a certificate from the old root: every peer would
  refuse it.

Sidecars not heard from within LIVE_S are left out (gone, or not yet back); sidecars
with no certificate hold nothing to break.
"""
from __future__ import annotations

import time
from typing import Any

from cryptography import x509

from meshlens.control.ca import CA
from meshlens.policy.resources import Resource
from meshlens.policy.trust import fingerprint

__all__ = ["KIND", "LIVE_S", "RotationRefused", "check_step", "status", "trust_resource"]

KIND, NAME = "TrustBundle", "mesh"
# A sidecar polls at least every SNAPSHOT_WAIT_S (30 s): one not heard from in two polls is not counted.
LIVE_S = 70.0


class RotationRefused(Exception):
    """A step that would break the sidecars it names."""


def trust_resource(ca: CA) -> Resource:
    doc = {"apiVersion": "meshlens.io/v1alpha1", "kind": KIND, "metadata": {"name": NAME}, "spec": ca.trust()}
    return Resource(KIND, NAME, doc)


def _live(sidecars: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    return [s for s in sidecars if s["certificate_root"] and now - s["last_seen"] <= LIVE_S]


def check_step(step: str, ca: CA, sidecars: list[dict[str, Any]], now: float | None = None) -> None:
    """RotationRefused when `step` would break a live sidecar."""
    live = _live(sidecars, now or time.time())
    if step == "switch":
        new = fingerprint(ca.roots[1]) if len(ca.roots) > 1 else ""
        behind = [s for s in live if new not in s["trusts"]]
        if behind:
            raise RotationRefused(f"{len(behind)} sidecar(s) do not trust the new root yet, and would refuse "
                                  f"certificates signed by it: {_names(behind)} (they take it with their next "
                                  f"snapshot; --force to switch anyway)")
    elif step == "finish":
        signer = fingerprint(ca.roots[0])
        behind = [s for s in live if s["certificate_root"] != signer]
        if behind:
            raise RotationRefused(f"{len(behind)} sidecar(s) still hold a certificate from the old root, which every "
                                  f"peer would refuse once it is dropped: {_names(behind)} (they renew within "
                                  f"seconds of the switch; --force to finish anyway)")


def _names(sidecars: list[dict[str, Any]]) -> str:
    shown = [f"{s['service']}/{s['instance']}" for s in sidecars[:10]]
    return ", ".join(shown) + (f" and {len(sidecars) - 10} more" if len(sidecars) > 10 else "")


def status(ca: CA, sidecars: list[dict[str, Any]], counts: dict[str, int], now: float | None = None
           ) -> dict[str, Any]:
    """`GET /v1/ca`: the roots, where a rotation stands, what each live sidecar holds, and the step that is next."""
    now = now or time.time()
    signer = fingerprint(ca.roots[0])
    roles = {signer: "signer"}
    for r in ca.roots[1:]:
        roles[fingerprint(r)] = {"begun": "next", "switched": "previous"}.get(ca.rotation, "trusted")
    live = _live(sidecars, now)
    step = {"none": "begin", "begun": "switch", "switched": "finish"}[ca.rotation]
    try:
        check_step(step, ca, sidecars, now)
        ready, why = True, ""
    except RotationRefused as e:
        ready, why = False, str(e)
    return {
        "trust_domain": ca.trust_domain, "rotation": ca.rotation, "own_files": ca.directory is None,
        "roots": [_root(r, roles[fingerprint(r)]) for r in ca.roots],
        "next_step": step if ca.directory is not None else None, "ready": ready, "not_ready": why,
        "issued": counts.get("issued", 0), "refused": counts.get("refused", 0),
        "sidecars": [{"service": s["service"], "instance": s["instance"], "certificate_root": s["certificate_root"],
                      "certificate_root_role": roles.get(s["certificate_root"], "unknown"),
                      "trusts": [roles.get(t, "unknown") for t in s["trusts"]]} for s in live],
    }


def _root(cert: x509.Certificate, role: str) -> dict[str, Any]:
    return {"fingerprint": fingerprint(cert), "subject": cert.subject.rfc4514_string(), "role": role,
            "not_after": cert.not_valid_after_utc.isoformat()}

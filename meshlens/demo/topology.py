"""The demo shop's layout: which instances run, their faults, their ports, and the mesh.yaml they share."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# The injected faults, named once: the shop flags that cause them and the words the demo prints.
PAYMENT_SLOW_SHARE = 0.05
PAYMENT_SLOW_SECONDS = (0.8, 1.5)
FLAKY_INVENTORY = "inventory-3"
FLAKY_ERROR_SHARE = 0.15
# Its failures come in runs of this many calls on average: a run of 3 (what outlier detection is recommended to
# eject on) every ~5 s of its traffic at the default rate, so ejection shows within a phase of the demo.
FLAKY_ERROR_RUN = 2.5
BROKEN_ROUTE = "GET catalog /items/{id}/reviews"
INGRESS = "ingress"      # the shoppers' sidecar: a meshed caller with no inbound side
UNMESHED = "reports"     # the legacy job: calls catalog's inbound port directly, no sidecar
# Istio's injector labels a meshed pod so; callers' sidecars originate mTLS to an instance labelled so (auto mTLS).
MESHED_LABEL = {"security.istio.io/tlsMode": "istio"}
# The services whose calls cart makes: their mode governs those calls, so these are what the demo enforces.
ENFORCED = ("inventory", "payment")


@dataclass
class Instance:
    """One application instance and its sidecar's ports (0 until chosen)."""

    service: str
    name: str
    shop_flags: list[str] = field(default_factory=list)
    app_port: int = 0
    inbound_port: int = 0
    outbound_port: int = 0


def shop_instances() -> list[Instance]:
    """frontend, catalog, cart, payment (slow tail) and three inventory instances (the third one flaky).

    Three inventory instances, not two: outlier detection compares an instance with
    the median of its peers, and with two the median is halfway to the bad one.
    """
    lo, hi = PAYMENT_SLOW_SECONDS
    return [
        Instance("frontend", "frontend"),
        Instance("catalog", "catalog"),
        Instance("cart", "cart"),
        Instance("payment", "payment", ["--slow-share", str(PAYMENT_SLOW_SHARE), "--slow-seconds", f"{lo},{hi}"]),
        Instance("inventory", "inventory-1"),
        Instance("inventory", "inventory-2"),
        Instance("inventory", FLAKY_INVENTORY, ["--error-share", str(FLAKY_ERROR_SHARE),
                                                "--error-run", str(FLAKY_ERROR_RUN)]),
    ]


def mesh_document(instances: list[Instance]) -> dict:
    """mesh.yaml: every service at its sidecars' inbound ports (callers reach an instance through its sidecar),
    every instance meshed: the sidecars speak mTLS to each other from the first call."""
    services: dict[str, dict] = {INGRESS: {"instances": []}}
    for inst in instances:
        entry = {"address": f"127.0.0.1:{inst.inbound_port}", "labels": {"instance": inst.name, **MESHED_LABEL}}
        svc = services.setdefault(inst.service, {"instances": [], "subsets": {}})
        svc["instances"].append(entry)
        svc["subsets"][inst.name] = {"instance": inst.name}  # so each call names the instance it reached
    return {"services": services}


def write_mesh(path: Path, instances: list[Instance]) -> Path:
    # JSON is YAML: one writer, no YAML dumper needed.
    path.write_text(json.dumps(mesh_document(instances), indent=1) + "\n")
    return path


def faults_text() -> str:
    lo, hi = PAYMENT_SLOW_SECONDS
    return (f"payment: {PAYMENT_SLOW_SHARE:.0%} of calls take {lo:g}-{hi:g}s; "
            f"{FLAKY_INVENTORY}: {FLAKY_ERROR_SHARE:.0%} of calls answer 503, in runs; "
            f"{BROKEN_ROUTE}: always 503")

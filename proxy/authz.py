"""AuthorizationPolicy, as Istio evaluates it for a workload: which policies apply, and what they decide.

No I/O. Istio's semantics (istio.io/latest/docs/reference/config/security/authorization-policy,
and concepts/security "Authorization policy precedence"):

- A policy applies to the service when it is in the service's namespace and its selector's
  labels are the service's (a service's labels are its instance's, and `app: <service>`,
  the Kubernetes convention its selector is written against), or when it sits in the
  root namespace (`istio-system`) with no selector: mesh-wide.
- Order: a DENY policy that matches denies; then, with no ALLOW policy, the request is
  allowed; with ALLOW policies, one of them must match. AUDIT policies decide nothing: a
  match is recorded (`audited`). CUSTOM (an external authorizer) is stored and not
  evaluated here.
- A policy matches when one of its rules does; a policy with no rules matches nothing
  (so an ALLOW policy `spec: {}` denies everything), and an empty rule `{}` matches
  everything. A rule matches when each of its parts does: `from` (one of its sources),
  `to` (one of its operations), `when` (every condition). Within a source or an
  operation every field must hold; a field holds when one of its values matches, its
  `not` form when none does.
- Values match exactly, or as a prefix (`abc*`), a suffix (`*abc`), or presence (`*`).
  Hosts match case-blind; paths match the path without its query.
- Source identity is the mTLS peer's SPIFFE id (a principal is it without `spiffe://`;
  its namespace is the `ns/` part). A plaintext caller has none: `principals` and
  `namespaces` never match it, and their `not` forms always do (an ALLOW on principals
  refuses plaintext, as in Istio). `ipBlocks` match the caller's address (CIDR or IP);
  `remoteIpBlocks` the same (no gateway in front here). JWT fields (`requestPrincipals`,
  `request.auth.*`) and `when` keys meshlens does not know never match (an ALLOW rule
  using them allows nothing; a DENY rule using them denies nothing), and applying such a
  policy says so with a warning.
- A denied request is answered 403 `RBAC: access denied`, flag `RBAC`, as from Envoy. The
  `istio.io/dry-run: "true"` annotation, or the service's dry-run mode, records
  `would_deny` instead.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshlens.policy.security import ROOT_NAMESPACE, peer_authentication  # shared with the control plane's gate

if TYPE_CHECKING:
    from meshlens.protocols.http1 import RequestHead

__all__ = ["ROOT_NAMESPACE", "Policy", "Request", "Verdict", "applicable", "compile_policy", "condition_getter", "decide",
           "peer_authentication"]



@dataclass(frozen=True, slots=True)
class Request:
    """What a rule looks at, for one request."""

    head: RequestHead
    peer_ip: str
    port: int
    """The port the request reached the workload on (the app's)."""
    principal: str = ""
    """The mTLS peer's SPIFFE id without spiffe:// ('' for plaintext)."""

    @property
    def namespace(self) -> str:
        parts = self.principal.split("/")
        return parts[parts.index("ns") + 1] if "ns" in parts[:-1] else ""

    @property
    def service_account(self) -> str:
        parts = self.principal.split("/")
        return parts[parts.index("sa") + 1] if "sa" in parts[:-1] else ""


Test = Callable[[Request], bool]


def _value_matcher(pattern: str, fold: bool = False) -> Callable[[str], bool]:
    """Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present)."""
    if fold:
        pattern = pattern.lower()
    if pattern == "*":
        return lambda v: bool(v)
    if pattern.endswith("*"):
        head = pattern[:-1]
        return (lambda v: v.lower().startswith(head)) if fold else (lambda v: v.startswith(head))
    if pattern.startswith("*"):
        tail = pattern[1:]
        return (lambda v: v.lower().endswith(tail)) if fold else (lambda v: v.endswith(tail))
    return (lambda v: v.lower() == pattern) if fold else (lambda v: v == pattern)


def _any(values: list[str], get: Callable[[Request], str], fold: bool = False) -> Test:
    """One of the values matches what `get` reads (never an absent one)."""
    ms = [_value_matcher(str(v), fold) for v in values]

    def test(r: Request) -> bool:
        v = get(r)
        return v != "" and any(m(v) for m in ms)
    return test


def _ip_blocks(values: list[str]) -> Test:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            continue  # refused when applied (meshlens.policy.security); never matches here

    def test(r: Request) -> bool:
        try:
            ip = ipaddress.ip_address(r.peer_ip)
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in nets)
    return test


def _header(raw: bytes, name: str) -> str:
    from meshlens.proxy.routing import field_value

    return field_value(raw, raw.lower(), name.lower().encode("latin-1")) or ""


_NEVER: Test = lambda r: False  # noqa: E731


def _source(spec: dict[str, Any]) -> list[Test]:
    tests: list[Test] = []
    fields: dict[str, Callable[[Request], str]] = {
        "principals": lambda r: r.principal, "namespaces": lambda r: r.namespace,
        "serviceAccounts": lambda r: f"{r.namespace}/{r.service_account}" if r.principal else ""}
    for field, get in fields.items():
        if field in spec:
            tests.append(_any(spec[field], get))
        negative = "not" + field[0].upper() + field[1:]
        if negative in spec:
            t = _any(spec[negative], get)
            tests.append(lambda r, t=t: not t(r))
    for field in ("ipBlocks", "remoteIpBlocks"):
        if field in spec:
            tests.append(_ip_blocks(spec[field]))
        negative = "not" + field[0].upper() + field[1:]
        if negative in spec:
            t = _ip_blocks(spec[negative])
            tests.append(lambda r, t=t: not t(r))
    if "requestPrincipals" in spec:
        tests.append(_NEVER)  # JWT: not verified here
    return tests


def _operation(spec: dict[str, Any]) -> list[Test]:
    tests: list[Test] = []
    fields: dict[str, tuple[Callable[[Request], str], bool]] = {
        "hosts": (lambda r: r.head.authority, True), "methods": (lambda r: r.head.method, False),
        "paths": (lambda r: r.head.path, False), "ports": (lambda r: str(r.port), False)}
    for field, (get, fold) in fields.items():
        if field in spec:
            tests.append(_any(spec[field], get, fold))
        negative = "not" + field[0].upper() + field[1:]
        if negative in spec:
            t = _any(spec[negative], get, fold)
            tests.append(lambda r, t=t: not t(r))
    return tests


def condition_getter(key: str) -> Callable[[Request], str] | None:
    """The value a `when` key names, or None when meshlens does not know the key."""
    if key.startswith("request.headers[") and key.endswith("]"):
        name = key[len("request.headers["):-1]
        return lambda r: _header(r.head.raw, name)
    return {"source.ip": lambda r: r.peer_ip, "remote.ip": lambda r: r.peer_ip,
            "source.principal": lambda r: r.principal, "source.namespace": lambda r: r.namespace,
            "source.serviceAccount": lambda r: f"{r.namespace}/{r.service_account}" if r.principal else "",
            "destination.port": lambda r: str(r.port)}.get(key)


def _condition(spec: dict[str, Any]) -> Test:
    get = condition_getter(str(spec["key"]))
    if get is None:
        return _NEVER
    key = str(spec["key"])
    if key in ("source.ip", "remote.ip"):
        pos = _ip_blocks(spec["values"]) if "values" in spec else None
        neg = _ip_blocks(spec["notValues"]) if "notValues" in spec else None
    else:
        pos = _any(spec["values"], get) if "values" in spec else None
        neg = _any(spec["notValues"], get) if "notValues" in spec else None
    return lambda r: (pos is None or pos(r)) and (neg is None or not neg(r))


def _rule(spec: dict[str, Any]) -> Test:
    sources = [_source(s.get("source") or {}) for s in spec.get("from") or ()]
    operations = [_operation(o.get("operation") or {}) for o in spec.get("to") or ()]
    conditions = [_condition(c) for c in spec.get("when") or ()]

    def test(r: Request) -> bool:
        if sources and not any(all(t(r) for t in src) for src in sources):
            return False
        if operations and not any(all(t(r) for t in op) for op in operations):
            return False
        return all(c(r) for c in conditions)
    return test


@dataclass(frozen=True)
class Policy:
    name: str
    """namespace/name."""
    action: str
    dry_run: bool
    """The istio.io/dry-run annotation: its decisions are recorded, not carried out."""
    rules: tuple[Test, ...]

    def matches(self, r: Request) -> bool:
        return any(rule(r) for rule in self.rules)


def compile_policy(name: str, doc: dict[str, Any]) -> Policy:
    spec = doc.get("spec") or {}
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    return Policy(name, str(spec.get("action", "ALLOW")), str(annotations.get("istio.io/dry-run", "")).lower() == "true",
                  tuple(_rule(r or {}) for r in spec.get("rules") or ()))


def applicable(name: str, doc: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    """Does the policy `namespace/name` apply to a service in `namespace` with these labels?"""
    ns = name.split("/", 1)[0]
    selector = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels")
    if ns == ROOT_NAMESPACE and not selector:
        return True
    if ns != namespace:
        return False
    return not selector or all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Verdict:
    """What the policies decide for one request."""

    deny: bool
    """Refuse it now (403)."""
    would_deny: bool
    """Not refused, but it would be: the service is in dry-run, or only dry-run policies refuse it."""
    policy: str
    """Which policy refuses it: namespace/name, or 'no ALLOW policy matched'."""
    audited: bool


def _refuser(policies: list[Policy], r: Request) -> str:
    """Who refuses the request among `policies` ('' when they allow it): a DENY that matches, else a missing ALLOW."""
    for p in policies:
        if p.action == "DENY" and p.matches(r):
            return p.name
    allows = [p for p in policies if p.action == "ALLOW"]
    if allows and not any(p.matches(r) for p in allows):
        return "no ALLOW policy matched"
    return ""


def decide(policies: tuple[Policy, ...], r: Request, dry_run: bool = False) -> Verdict:
    """Istio's order over the enforced policies (DENY first; then, if there are ALLOW policies, one must match),
    and over all of them as if the dry-run ones were enforced too: what dry-run records. `dry_run`: the service's
    mode, in which nothing is refused."""
    audited = any(p.action == "AUDIT" and p.matches(r) for p in policies)
    enforced = [p for p in policies if not p.dry_run and p.action in ("ALLOW", "DENY")]
    real = _refuser(enforced, r) if not dry_run else ""
    if real:
        return Verdict(True, False, real, audited)
    shadow = _refuser([p for p in policies if p.action in ("ALLOW", "DENY")], r)
    return Verdict(False, bool(shadow), shadow, audited)

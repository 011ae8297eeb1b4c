"""What a sidecar applies, from its snapshot: per destination service, its mode and its policies in a chain.

`Policies.build` reads a control-plane snapshot's documents (each checked again with
meshlens.policy, as the control plane checked it: a snapshot that does not read is
NACKed) and keeps, for every service whose mode is `dry-run` or `enforce`, one
`Destination`: its VirtualService rules (proxy/routing.py), its DestinationRule's
subsets, connection pool (proxy/limits.py `Breaker`) and outlier detection
(proxy/outlier.py), and the chain its calls run through. A service in `observe` has
none: its calls take the path they took before any policy existed.

A service's mode governs calls **to** it. Traffic policies run in the callers' sidecars
(outbound, as Envoy applies them client side): fault injection, mirroring, the route's
timeout (armed before the pool's turn, so a request waiting for it is timed too), the
pool's limits, outlier detection, retries, in that order. Inbound, the service's
own sidecar applies its LocalRateLimit. Each policy runs in the destination's mode:
enforced, it acts and the record says what it did; in dry-run it decides the same way
on the same exchange and the record says what it would have done (chain.WOULD), while
the traffic stays as observe would have it.

Where several VirtualServices name one host, the first by namespace/name is used (Istio
also uses one, the oldest); likewise one DestinationRule a host.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlens.proxy.chain import Chain, Decision, Kind, note
from meshlens.proxy.connect import UO, LocalReply
from meshlens.proxy.h2_fields import http_status_of_grpc
from meshlens.proxy.limits import SENT, Breaker, PoolLimits, TokenBucket
from meshlens.proxy.outlier import Outlier, OutlierConfig
from meshlens.proxy.retries import DEFAULT_RETRY, RetryPolicy, no_response
from meshlens.proxy.routing import HttpRule, Routes, applicable_blocks

if TYPE_CHECKING:
    from meshlens.mesh import Mesh
    from meshlens.protocols.http1 import ResponseHead
    from meshlens.proxy.exchange import Exchange

__all__ = ["DI", "FI", "NO_ROUTE", "OVERFLOW", "RBAC_DENIED", "RL", "Destination", "Policies"]

FI = "FI"
"""Envoy's response flag: the request was aborted with a response code by fault injection."""
DI = "DI"
"""Envoy's response flag: the request was delayed by fault injection."""
RL = "RL"
"""Envoy's response flag: the request was rate-limited locally, in addition to a 429."""
# Envoy's answer to a request its circuit breakers refuse.
OVERFLOW = LocalReply(503, "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                      "overflow", UO)
NO_ROUTE = LocalReply(404, "no route matched the request (VirtualService)", "no_route", "NR")
_OVERFLOWED = Decision(Kind.REPLY, "overflow", OVERFLOW)
_PENDING = Decision(Kind.WAIT, "pending")


class Destination:
    """Calls to one service, in its mode: the routes, subsets and cluster-wide state, and the chain."""

    __slots__ = ("service", "mode", "enforced", "routes", "breaker", "outlier", "limits", "bucket", "chain",
                 "mtls", "mtls_ports")

    def __init__(self, service: str, mode: str) -> None:
        self.service = service
        self.mode = mode
        """dry-run or enforce."""
        self.enforced = mode == "enforce"
        self.routes: Routes | None = None
        self.breaker: Breaker | None = None
        self.outlier: Outlier | None = None
        self.limits = PoolLimits()
        self.bucket: TokenBucket | None = None
        """Inbound only: the LocalRateLimit's bucket."""
        self.mtls = "PERMISSIVE"
        """Inbound only: the PeerAuthentication mode (STRICT, PERMISSIVE, DISABLE) and its port-level ones."""
        self.mtls_ports: dict[int, str] = {}
        self.chain = Chain()

    def __repr__(self) -> str:
        return f"<Destination {self.service} {self.mode} {self.chain}>"


class Policies:
    """Everything one sidecar applies, from one snapshot (per process)."""

    def __init__(self, outbound: dict[str, Destination], inbound: Destination | None,
                 subsets: dict[str, dict[str, dict[str, str]]]) -> None:
        self.outbound = outbound
        """Services in dry-run or enforce -> their Destination."""
        self.inbound = inbound
        """This sidecar's own service, in dry-run or enforce."""
        self.subsets = subsets
        """Every DestinationRule's subsets, whatever its service's mode: service -> name -> labels."""

    def __repr__(self) -> str:
        return f"<Policies outbound={list(self.outbound)} inbound={self.inbound}>"

    @classmethod
    def build(cls, mesh: Mesh, own: str, modes: dict[str, str], documents: list[Any],
              random: Callable[[], float], old: Policies | None = None,
              labels: dict[str, str] | None = None) -> Policies:
        """`labels`: this sidecar's instance's (the AuthorizationPolicy selectors it falls under).
        Raises ValueError naming the document when one does not read (the sidecar NACKs the snapshot)."""
        from meshlens.proxy import authz

        from meshlens.policy.networking import service_of
        from meshlens.policy.resources import ResourceError, read_document

        routes: dict[str, Routes] = {}
        rules: dict[str, tuple[str, dict[str, Any]]] = {}
        buckets: list[dict[str, Any]] = []
        own_service = mesh.services.get(own)
        own_labels = {"app": own, **(labels or {})}
        authorizations: list[authz.Policy] = []
        peer_auth: list[tuple[str, dict[str, Any]]] = []
        resources = []
        for i, doc in enumerate(documents):
            try:
                resources.append(read_document(doc, f"snapshot policy {i + 1}"))
            except ResourceError as e:
                raise ValueError(str(e)) from None
        for r in sorted(resources, key=lambda r: r.key):
            ns = r.name.split("/", 1)[0]
            spec = r.doc["spec"]
            if r.kind == "VirtualService":
                compiled = tuple(HttpRule(h, lambda host, ns=ns: service_of(host, ns)[0], blocks)
                                 for h in spec.get("http") or ()
                                 if (blocks := applicable_blocks(h, own_labels)) is not None)
                for host in spec["hosts"]:
                    routes.setdefault(service_of(host, ns)[0], Routes(compiled, r.name))
            elif r.kind == "DestinationRule":
                rules.setdefault(service_of(spec["host"], ns)[0], (r.name, spec))
            elif r.kind == "LocalRateLimit" and spec["service"] == own:
                buckets.append(spec)
            elif r.kind == "PeerAuthentication":
                peer_auth.append((r.name, r.doc))
            elif r.kind == "AuthorizationPolicy" and own_service is not None and \
                    authz.applicable(r.name, r.doc, own_service.namespace, own_labels):
                authorizations.append(authz.compile_policy(r.name, r.doc))
        outbound: dict[str, Destination] = {}
        for service in mesh.services:
            mode = modes.get(service, "observe")
            if mode == "observe":
                continue
            dest = outbound[service] = Destination(service, mode)
            kept = old.outbound.get(service) if old is not None else None
            dest.routes = routes.get(service)
            if service in rules:
                spec = rules[service][1]
                policy = spec.get("trafficPolicy") or {}
                if "connectionPool" in policy:
                    dest.limits = PoolLimits.from_spec(policy["connectionPool"])
                if "outlierDetection" in policy:
                    config = OutlierConfig.from_spec(policy["outlierDetection"])
                    kept_outlier = kept.outlier if kept is not None else None
                    # the state goes on across snapshots with the same settings (ejections, counts, multipliers)
                    dest.outlier = kept_outlier if kept_outlier is not None and kept_outlier.config == config \
                        else Outlier(config)
            # the pool's counts go on across snapshots with the same limits: exchanges in flight count in them
            dest.breaker = kept.breaker if kept is not None and kept.breaker is not None \
                and kept.limits == dest.limits else Breaker(dest.limits)
            # only the policies something asks for: each one in the chain costs every call
            http = dest.routes.rules if dest.routes is not None else ()
            chain: list[Any] = []
            if any(r.fault is not None for r in http):
                chain.append(Fault(dest, random))
            if any(r.mirror is not None for r in http):
                chain.append(Mirror(dest, random))
            if any(r.timeout or (r.retry is not None and r.retry.per_try_timeout) for r in http):
                chain.append(Timeout(dest))  # before the pool: a request waiting its turn is timed too
            if dest.limits != PoolLimits():
                chain.append(Overflow(dest))
            if dest.outlier is not None or any(d[0] != service for r in http for d in r.destinations):
                chain.append(Ejection(dest, outbound))
            chain.append(Retry(dest, outbound, random))
            dest.chain = Chain(chain)
        inbound = None
        own_mode = modes.get(own, "observe")
        if own_mode != "observe":
            inbound = Destination(own, own_mode)
            if own_service is not None:
                inbound.mtls, inbound.mtls_ports = authz.peer_authentication(peer_auth, own_service.namespace,
                                                                             own_labels)
            chain = []
            if authorizations:
                chain.append(Authorization(inbound, tuple(authorizations)))
            if buckets:
                inbound.bucket = TokenBucket.from_spec(buckets[0])
                chain.append(RateLimit(inbound))
            inbound.chain = Chain(chain)
        subsets = {service: {s["name"]: dict(s.get("labels") or {}) for s in spec.get("subsets") or ()}
                   for service, (_, spec) in rules.items()}
        return cls(outbound, inbound, subsets)


# -- the policies, in the order a chain runs them ------------------------------------------------------


class Fault:
    """A route's fault injection: a delay, then an abort, each on its share of requests (Envoy's fault filter)."""

    name = "fault"

    def __init__(self, dest: Destination, random: Callable[[], float]) -> None:
        self.mode = dest.mode
        self.random = random

    def on_request(self, ex: Exchange) -> Decision | None:
        rule = ex.route.rule if ex.route is not None else None
        fault = rule.fault if rule is not None else None
        if fault is None:
            return None
        if fault.delay_share and not ex.delayed:
            ex.delayed = True
            if self.random() < fault.delay_share:
                if self.mode == "enforce":
                    ex.flags = ex.flags + ",DI" if ex.flags else DI
                return Decision(Kind.DELAY, "fault_injected", delay=fault.delay)
        if fault.abort_share and self.random() < fault.abort_share:
            return Decision(Kind.REPLY, "fault_injected", LocalReply(fault.abort_status, "fault filter abort",
                                                                      "fault", FI))
        return None


class Mirror:
    """A route's mirror: a copy of the request to another destination, on its share (proxy/mirror.py)."""

    name = "mirror"

    def __init__(self, dest: Destination, random: Callable[[], float]) -> None:
        self.mode = dest.mode
        self.random = random

    def on_request(self, ex: Exchange) -> None:
        rule = ex.route.rule if ex.route is not None else None
        if rule is None or rule.mirror is None or self.random() >= rule.mirror_share:
            return None
        if self.mode != "enforce":
            note(self, ex, "mirrored")
            return None
        ex.mirror_to = rule.mirror
        if ex.request_done:
            ex.send_mirror()
        return None


class Overflow:
    """The destination's connection pool limits: a request beyond them waits its turn, or is refused 503 UO."""

    name = "pool"

    def __init__(self, dest: Destination) -> None:
        self.mode = dest.mode
        self.enforced = dest.enforced
        self.breaker = dest.breaker
        self.per_connection = dest.limits.max_requests_per_connection
        self.connect_timeout = dest.limits.connect_timeout
        self.idle_timeout = dest.limits.idle_timeout

    def on_request(self, ex: Exchange) -> Decision | None:
        breaker = self.breaker
        assert breaker is not None
        ex.breaker = breaker
        if self.enforced:
            ex.per_connection = self.per_connection
            ex.connect_timeout = self.connect_timeout
            ex.idle_timeout = self.idle_timeout
        lim = breaker.limits
        sent = breaker.sent
        if sent < lim.max_connections and sent < lim.max_requests:  # Breaker.admit's common case, inline
            breaker.sent = sent + 1
            ex.slot = SENT
            return None
        admitted = breaker.admit(ex)
        if admitted == "overflow":
            return _OVERFLOWED
        if admitted == "pending" and self.enforced:
            return _PENDING
        return None

    def on_end(self, ex: Exchange) -> None:
        breaker = ex.breaker
        if breaker is None:
            return
        ex.breaker = None
        if ex.slot == SENT and not breaker.pending and not ex.retrying:  # Breaker.ended's common case, inline
            ex.slot = 0
            breaker.sent -= 1
            return
        nxt = breaker.ended(ex)
        if nxt is not None and nxt.waiting:  # enforced, it was held (dry-run's pending ones only pretend)
            nxt.resume()


class Timeout:
    """The route's `timeout` (the whole response) and its retries' `perTryTimeout` (each attempt's head)."""

    name = "timeout"

    def __init__(self, dest: Destination) -> None:
        self.mode = dest.mode

    def on_request(self, ex: Exchange) -> None:
        rule = ex.route.rule if ex.route is not None else None
        if rule is None:
            return None
        retry = _retry_policy(ex)
        if self.mode == "enforce":
            if rule.timeout:
                client = getattr(ex.head, "deadline", None)  # a gRPC client's own, when sooner, stays
                if client is None or rule.timeout < client:
                    ex.deadline(rule.timeout, "timed_out")
            ex.per_try = retry.per_try_timeout
        return None

    def on_response(self, ex: Exchange, head: ResponseHead) -> None:
        rule = ex.route.rule if ex.route is not None else None
        if self.mode != "enforce" and rule is not None:
            per_try = _retry_policy(ex).per_try_timeout
            if per_try and ex.env.now_ns() - ex.t0 > per_try * 1e9:  # dry-run makes one attempt: from the start
                note(self, ex, "timed_out")
        return None

    def on_end(self, ex: Exchange) -> None:
        if self.mode == "enforce" or ex.route is None:
            return
        rule = ex.route.rule
        if rule is not None and rule.timeout and ex.env.now_ns() - ex.t0 > rule.timeout * 1e9 \
                and "would_timeout" not in ex.actions:
            note(self, ex, "timed_out")


class Ejection:
    """Outlier detection: each attempt's result counts for its endpoint; the one that trips ejects it."""

    name = "outlier"

    def __init__(self, dest: Destination, outbound: dict[str, Destination]) -> None:
        self.mode = dest.mode
        self.outbound = outbound

    def _result(self, ex: Exchange, status: int) -> None:
        route = ex.route
        ep = route.endpoint if route is not None else None
        if ep is None:
            return
        target = self.outbound.get(route.dst_service)
        outlier = target.outlier if target is not None else None
        if outlier is None:
            return
        cluster = ex.env.cluster(route.dst_service)
        if cluster is not None and outlier.result(cluster.endpoints, ep, status, ex.env.now_ns() / 1e9):
            note(self, ex, "ejected")

    def on_response(self, ex: Exchange, head: ResponseHead) -> None:
        status = head.status
        if ex.protocol == "grpc" and status == 200:  # a gRPC call's result is its grpc-status, as Envoy maps it
            if head.grpc_status < 0:
                return  # in the trailers: counted at the end (on_end)
            status = http_status_of_grpc(head.grpc_status)
        if status < 500:  # a success: only a count to reset (Outlier.result's common case, inline)
            route = ex.route
            ep = route.endpoint if route is not None else None
            if ep is not None and (ep.consecutive_5xx or ep.consecutive_gateway):
                ep.consecutive_5xx = ep.consecutive_gateway = 0
            return
        self._result(ex, status)

    def on_error(self, ex: Exchange, reply: LocalReply) -> None:
        if no_response(reply) or reply.error == "refused_stream":
            self._result(ex, 503)  # a local-origin failure counts as a 503 (gateway error)

    def on_end(self, ex: Exchange) -> None:
        if ex.trailers is not None and ex.protocol == "grpc" and ex.grpc_status >= 0 and not ex.error:
            self._result(ex, http_status_of_grpc(ex.grpc_status))  # the grpc-status its trailers carried


class Retry:
    """The route's retries (Istio's default policy when it gives none): retriable results tried again."""

    name = "retry"

    def __init__(self, dest: Destination, outbound: dict[str, Destination], random: Callable[[], float]) -> None:
        self.mode = dest.mode
        self.random = random

    def _decide(self, ex: Exchange, policy: RetryPolicy, retriable: bool) -> Decision | None:
        retries = ex.attempt - 1
        if not retriable or retries >= policy.attempts or ex.replay is None:
            return None
        breaker = ex.breaker
        if self.mode == "enforce" and breaker is not None and not breaker.retry(ex):
            note(self, ex, "retry_overflow")
            return None
        return Decision(Kind.RETRY, "retried", delay=policy.backoff(retries + 1, self.random))

    def on_response(self, ex: Exchange, head: ResponseHead) -> Decision | None:
        policy = _retry_policy(ex)
        status = head.status
        if status < policy.lowest:
            code = head.grpc_status  # a trailers-only gRPC answer: its status is in its head
            if code > 0 and code in policy.grpc_codes:
                return self._decide(ex, policy, True)
            return None
        return self._decide(ex, policy, policy.retriable_status(status))

    def on_error(self, ex: Exchange, reply: LocalReply) -> Decision | None:
        if reply.error == "overflow" or reply.error == "no_healthy_upstream":
            return None
        policy = _retry_policy(ex)
        return self._decide(ex, policy, policy.retriable_failure(reply))


def _retry_policy(ex: Exchange) -> RetryPolicy:
    """The retries of the rule the exchange matched, else Istio's default policy."""
    rule = ex.route.rule if ex.route is not None else None
    return rule.retry if rule is not None and rule.retry is not None else DEFAULT_RETRY


RBAC_DENIED = LocalReply(403, "RBAC: access denied", "denied", "RBAC")


class Authorization:
    """Inbound: the AuthorizationPolicies that apply to this service (proxy/authz.py), in Istio's order."""

    name = "authz"

    def __init__(self, dest: Destination, policies: tuple[Any, ...]) -> None:
        self.mode = dest.mode
        self.policies = policies

    def on_request(self, ex: Exchange) -> Decision | None:
        from meshlens.proxy.authz import Request, decide

        route = ex.route
        verdict = decide(self.policies, Request(ex.head, ex.conn.peer[0], route.addr[1] if route is not None else 0,
                                                ex.peer_identity[len("spiffe://"):]), self.mode != "enforce")
        if verdict.audited:
            ex.actions += ("audited",)
        if verdict.deny:
            return _DENIED
        if verdict.would_deny:
            ex.actions += ("would_deny",)
        return None


_DENIED = Decision(Kind.REPLY, "denied", RBAC_DENIED)


class RateLimit:
    """Inbound: the service's LocalRateLimit token bucket; a request finding it empty gets 429."""

    name = "ratelimit"

    def __init__(self, dest: Destination) -> None:
        self.mode = dest.mode
        self.bucket = dest.bucket

    def on_request(self, ex: Exchange) -> Decision | None:
        bucket = self.bucket
        assert bucket is not None
        now = ex.env.now_ns() / 1e9
        if bucket.take(now):
            return None
        return Decision(Kind.REPLY, "rate_limited",
                        LocalReply(429, "local_rate_limited", "rate_limited", RL, bucket.headers(now)))


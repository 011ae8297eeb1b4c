"""meshlens' LocalRateLimit (Istio has no API for it): Envoy's local rate limit token bucket, checked.

    apiVersion: meshlens.io/v1alpha1
    kind: LocalRateLimit
    metadata: {name: payment-service}
    spec:
      service: payment-service    # whose inbound side it limits (default: the resource's name)
      tokenBucket:                # envoy.extensions.filters.http.local_ratelimit.v3, token_bucket
        maxTokens: 100            # the bucket's size: a burst of this many
        tokensPerFill: 100        # added every fillInterval (default 1, as Envoy)
        fillInterval: 1s

A request that finds the bucket empty is answered 429 by the service's own sidecar when the
service is in `enforce`, and recorded as `would_rate_limit` in `dry-run` (proxy/limits.py).
"""
from __future__ import annotations

from typing import Any

from meshlens.policy.spec import SpecError, Where, duration, message, run, string, uint

__all__ = ["check_local_rate_limit"]

_LOCAL_RATE_LIMIT = message({
    "service": string,
    "tokenBucket": message({"maxTokens": uint, "tokensPerFill": uint, "fillInterval": duration}),
})


def check_local_rate_limit(spec: dict[str, Any], namespace: str) -> list[tuple[Where, str]]:
    warnings = run(_LOCAL_RATE_LIMIT, spec)
    bucket = spec.get("tokenBucket")
    if not bucket or "maxTokens" not in bucket or "fillInterval" not in bucket:
        raise SpecError(("tokenBucket",), "needs maxTokens and fillInterval (tokensPerFill defaults to 1)")
    for field in ("maxTokens", "tokensPerFill"):
        if bucket.get(field, 1) < 1:
            raise SpecError(("tokenBucket", field), "must be 1 or more")
    return warnings

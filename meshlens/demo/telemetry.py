"""OpenTelemetry for the demo's applications: spans exported over OTLP/HTTP to the collector.

Server spans come from the aiohttp server instrumentor, client spans from an
aiohttp TraceConfig; a request hook names the called service (`peer.service`)
when the URL does not, as it does not for a caller that dials an address.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

# The SDK's default export delay is 5 s; 1 s keeps the demo's progress line close to live.
EXPORT_DELAY_MS = 1000


def tracer_provider(service: str, instance: str, collector: str) -> TracerProvider:
    """A provider for one application instance, exporting to `collector` (http://host:port)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.instance.id": instance}))
    exporter = OTLPSpanExporter(endpoint=collector.rstrip("/") + "/v1/traces", timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    return provider


@web.middleware
async def client_address(request: web.Request, handler: Any) -> web.StreamResponse:
    """Put the peer's address on the server span (OpenTelemetry's `client.address`), as the
    instrumentation does not: without it the caller of a server span has no name at all."""
    span = trace.get_current_span()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if span.is_recording() and peer:
        span.set_attribute("client.address", peer[0])
        span.set_attribute("client.port", peer[1])
    return await handler(request)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def instrument_server(provider: TracerProvider) -> None:
    """Server spans for every aiohttp Application created after this call.

    The instrumentor, not the bare middleware factory: only it initialises the
    module state (excluded URLs, meters) the middleware reads.
    """
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)


def client_trace_config(provider: TracerProvider, peer_of: Callable[[str, int], str] | None = None
                        ) -> aiohttp.TraceConfig:
    """Client spans naming the called service (`peer.service`): the URL's host when it is a service
    name (calls through the sidecar, `http://payment/charge`), else `peer_of(host, port)`."""

    def hook(span: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if span is None or not span.is_recording():
            return
        host = params.url.host or ""
        name = peer_of(host, params.url.port or 80) if peer_of is not None else ""
        if not name and host and not _is_address(host):
            name = host
        if name:
            span.set_attribute("peer.service", name)

    return create_trace_config(request_hook=hook, tracer_provider=provider)

"""Admin (`/healthz`, `/stats`, `/config`) and Prometheus (`/stats/prometheus`, `/metrics`) endpoints.

Served on the proxy's loop by a few lines over the sidecar's own HTTP/1.1 codec rather
than a web framework: these are scraped a few times a minute, and aiohttp alone would
add ~13 MB to every sidecar's RSS (measured: 25 MB for the proxy's imports, 38 MB with
aiohttp's). GET and HEAD only; keep-alive as the client asks.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshlens.protocols.errors import PeerError
from meshlens.protocols.http1 import RequestHead, RequestReader

if TYPE_CHECKING:
    from meshlens.proxy.server import Proxy

__all__ = ["start_admin"]

Page = tuple[int, str, bytes]  # status, content type, body
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_JSON, _TEXT = "application/json", "text/plain; charset=utf-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


def admin_pages(proxy: Proxy) -> dict[str, Callable[[], Page]]:
    def healthz() -> Page:
        return (503, _TEXT, b"draining\n") if proxy.draining else (200, _TEXT, b"ok\n")

    def stats() -> Page:
        return 200, _JSON, json.dumps(proxy.snapshot()).encode()

    def config() -> Page:
        cfg = proxy.config
        svc = proxy.service
        return 200, _JSON, json.dumps({
            "service": svc.name, "mode": proxy.mode, "observer_id": cfg.observer_id,
            "listeners": proxy.ports, "app": f"{cfg.app_host}:{cfg.app_port}" if cfg.app_port is not None else None,
            "recording": proxy.recorder.url if proxy.recorder is not None else None,
            "timeouts": {"header": cfg.header_timeout, "idle": cfg.idle_timeout, "drain": cfg.drain_timeout,
                         "upstream": cfg.upstream_timeout},
            "services": {name: [i.address for i in s.instances] for name, s in proxy.mesh.services.items()},
            "control": None if proxy.control is None else {
                "url": proxy.control.url, "version": proxy.control.version, "state": proxy.control.state,
                "error": proxy.control.error, "desired_mode": proxy.desired_mode, "mode": proxy.mode},
            "destinations": _destinations(proxy),
            "identity": proxy.identity.described() if proxy.identity is not None else None,
        }).encode()

    return {"/healthz": healthz, "/stats": stats, "/config": config}


def _destinations(proxy: Proxy) -> dict[str, dict[str, object]]:
    """The services whose calls run policies (dry-run or enforce), with what applies to them."""
    pol = proxy.router.policies
    if pol is None:
        return {}
    out: dict[str, dict[str, object]] = {}
    for name, d in pol.outbound.items():
        ejected = [f"{e.host}:{e.port}" for e in proxy.router.clusters[name].endpoints if e.ejected] \
            if d.outlier is not None and name in proxy.router.clusters else []
        out[name] = {"mode": d.mode, "virtual_service": d.routes.source if d.routes is not None else None,
                     "policies": [p.name for p in d.chain.policies], "ejected": ejected}
    return out


def metrics_pages(proxy: Proxy) -> dict[str, Callable[[], Page]]:
    def metrics() -> Page:
        gauges = {"downstream_cx_active": float(len(proxy.conns))}
        rec = proxy.recorder
        if rec is not None:
            gauges["recorder_buffered"] = float(rec.buffered)
            gauges["recorder_unsent_calls"] = float(rec.unsent_calls)
            for reason, n in rec.dropped.items():
                gauges[f'recorder_dropped_total{{reason="{reason}"}}'] = float(n)
        return 200, _PROMETHEUS, proxy.metrics.render(gauges).encode()

    return {"/stats/prometheus": metrics, "/metrics": metrics}  # Istio's path on 15090, and the usual one


class AdminConnection(asyncio.Protocol):
    """One client of an admin port; the consumer of its RequestReader."""

    def __init__(self, pages: dict[str, Callable[[], Page]]) -> None:
        self.pages = pages
        self.reader = RequestReader(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except PeerError as e:
            self._answer(RequestHead(), (e.status, _TEXT, f"{e}\n".encode()), close=True)

    def eof_received(self) -> bool | None:
        return None

    def on_request(self, head: RequestHead) -> None:
        pass

    def on_request_end(self, head: RequestHead, body_bytes: int) -> None:
        if head.method not in ("GET", "HEAD"):
            page: Page = (405, _TEXT, b"GET or HEAD only\n")
        else:
            handler = self.pages.get(head.path)
            page = handler() if handler is not None else (404, _TEXT, f"no page {head.path}\n".encode())
        self._answer(head, page, close=not head.keep_alive or head.upgrade)

    def _answer(self, head: RequestHead, page: Page, close: bool) -> None:
        if self.transport.is_closing():
            return
        status, ctype, body = page
        fields = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: {ctype}\r\n" \
                 f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\n"
        if close:
            fields += "connection: close\r\n"
        self.transport.write(fields.encode() + b"\r\n" + (b"" if head.method == "HEAD" else body))
        if close:
            self.transport.close()


async def start_admin(proxy: Proxy) -> tuple[list[asyncio.AbstractServer], dict[str, int]]:
    """Start the admin and metrics servers (port -1 = off); return them and their bound ports."""
    cfg = proxy.config
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    ports: dict[str, int] = {}
    for name, pages, port in (("admin", admin_pages(proxy), cfg.admin_port),
                              ("metrics", metrics_pages(proxy), cfg.metrics_port)):
        if port < 0:
            continue
        server = await loop.create_server(lambda pages=pages: AdminConnection(pages), cfg.local_host, port,
                                          reuse_address=True)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    return servers, ports

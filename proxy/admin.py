"""Admin (`/healthz`, `/stats`, `/config`) and Prometheus (`/stats/prometheus`, `/metrics`) endpoints.

aiohttp, on the proxy's loop: these are scraped a few times a minute, not the hot path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from meshlens.proxy.server import Proxy

__all__ = ["start_admin"]


def build_admin_app(proxy: Proxy) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        if proxy.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(proxy.snapshot())

    async def config(_: web.Request) -> web.Response:
        cfg = proxy.config
        svc = proxy.service
        return web.json_response({
            "service": svc.name, "mode": svc.mode, "observer_id": cfg.observer_id,
            "listeners": proxy.ports, "app": f"{cfg.app_host}:{cfg.app_port}" if cfg.app_port is not None else None,
            "recording": proxy.recorder.url if proxy.recorder is not None else None,
            "timeouts": {"header": cfg.header_timeout, "idle": cfg.idle_timeout, "drain": cfg.drain_timeout},
            "services": {name: [i.address for i in s.instances] for name, s in cfg.mesh.services.items()},
        })

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config", config)
    return app


def build_metrics_app(proxy: Proxy) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        gauges = {"downstream_cx_active": float(len(proxy.conns))}
        if proxy.recorder is not None:
            gauges["recorder_buffered"] = float(proxy.recorder.buffered)
            for reason, n in proxy.recorder.dropped.items():
                gauges[f'recorder_dropped_total{{reason="{reason}"}}'] = float(n)
        return web.Response(text=proxy.metrics.render(gauges), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application()
    app.router.add_get("/stats/prometheus", metrics)  # Istio's path on 15090
    app.router.add_get("/metrics", metrics)
    return app


async def start_admin(proxy: Proxy) -> tuple[list[web.AppRunner], dict[str, int]]:
    """Start the admin and metrics servers (port -1 = off); return their runners and bound ports."""
    cfg = proxy.config
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    for name, app, port in (("admin", build_admin_app(proxy), cfg.admin_port),
                            ("metrics", build_metrics_app(proxy), cfg.metrics_port)):
        if port < 0:
            continue
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.local_host, port)
        await site.start()
        runners.append(runner)
        ports[name] = runner.addresses[0][1]
    return runners, ports

"""The API reads only the console needs, under /v1/console/ (a read token, as every GET of the API):

    GET /v1/console/whoami                          {"tokens": bool, "name", "role"}: who the page asks as
    GET /v1/console/map?window=15m                  the service map: services (the stored mesh's and the calls'),
                                                    edges with their figures, and the calls' state in one line
    GET /v1/console/services/{service}              its mode, instances, sidecars, the policies naming it (YAML)
    GET /v1/console/services/{service}/traffic?window=15m
                                                    its calls' edges, recommendations with evidence and what-if,
                                                    mTLS readiness, the dry-run report
    GET /v1/console/tail?after=NS&service=S&status=5xx&limit=100
                                                    the newest calls after the cursor (control/console/tail.py)

A bad parameter is 400 {"error": one line} (params.py); a service the stored mesh does not define, 404. The calls are
read through calls.py: without a calls store, or with one that does not answer, the map still shows the mesh's
services and says why there is no traffic in one line, and the other reads of calls answer 503/504 with that line.
A window without calls is no error: {"calls": {"state": "none", "message": ...}}.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web

from meshlens.analysis import proposal
from meshlens.analysis.scope import NoData, UnknownService
from meshlens.control.console import params
from meshlens.control.console.calls import CallsReader, CallsUnavailable
from meshlens.control.console.figures import service_map, service_traffic
from meshlens.control.console.policies import naming
from meshlens.control.console.tail import tail
from meshlens.mesh import Mesh, MeshError, parse

__all__ = ["CALLS", "routes"]

CALLS = web.AppKey("console_calls", CallsReader)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/console/whoami", _whoami),
        web.get("/v1/console/map", _answered(_map)),
        web.get("/v1/console/services/{service}", _answered(_service)),
        web.get("/v1/console/services/{service}/traffic", _answered(_traffic)),
        web.get("/v1/console/tail", _answered(_tail)),
    ]


class _Missing(LookupError):
    """404: what the path names does not exist."""


def _answered(handler: Handler) -> Handler:
    """Each refusal as the API words them: a 4xx or 5xx with {"error": one line}."""
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except params.BadParameter as e:
            return _error(400, str(e))
        except _Missing as e:
            return _error(404, str(e))
        except CallsUnavailable as e:
            return _error(e.status, str(e))
    return answer


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": " ".join(message.split())}, status=status)


async def _whoami(request: web.Request) -> web.Response:
    token = request.get("token")
    if request.app["tokens"] is None:
        return web.json_response({"tokens": False, "name": None, "role": "write"})
    return web.json_response({"tokens": True, "name": token.name, "role": token.role})


async def _mesh(request: web.Request) -> Mesh | None:
    stored = await request.app["store"].get("Mesh", "mesh")
    try:
        return parse(stored.doc["spec"]) if stored is not None else None
    except MeshError:
        return None


async def _modes(request: web.Request, mesh: Mesh | None) -> dict[str, str]:
    modes = {name: "observe" for name in (mesh.services if mesh else ())}
    modes.update({r.name: r.doc["spec"]["mode"] for r in await request.app["store"].list("Mode")})
    return modes


async def _map(request: web.Request) -> web.Response:
    text, window = params.window(request.query)
    mesh = await _mesh(request)
    modes = await _modes(request, mesh)
    sidecars: dict[str, int] = {}
    for s in request.app["sidecars"].listed():
        sidecars[s["service"]] = sidecars.get(s["service"], 0) + 1
    try:
        drawn = await request.app[CALLS].read(lambda store: service_map(store, window))
        calls = {"state": "ok", "message": f"{drawn['n']:,} call records (all observers) in {drawn['window']}"}
    except NoData as e:
        drawn, calls = {"edges": [], "services": []}, {"state": "none", "message": str(e)}
    except CallsUnavailable as e:
        drawn, calls = {"edges": [], "services": []}, {"state": "unavailable", "message": str(e)}
    seen = {s["name"]: s for s in drawn["services"]}
    services = []
    for name in sorted(set(seen) | set(mesh.services if mesh else ())):
        s = seen.get(name, {"name": name, "level": 0, "caller": False, "meshed": False})
        services.append({**s, "in_mesh": mesh is not None and name in mesh.services, "mode": modes.get(name),
                         "sidecars": sidecars.get(name, 0)})
    return web.json_response({"window": text, "calls": calls, "services": services, "edges": drawn["edges"]})


async def _service(request: web.Request) -> web.Response:
    name = params.service(request.match_info["service"])
    mesh = await _mesh(request)
    svc = mesh.services.get(name) if mesh is not None else None
    if svc is None:
        raise _Missing(f"no service {name!r} in the mesh" + ("" if mesh else " (no Mesh is stored yet)"))
    store = request.app["store"]
    modes = await _modes(request, mesh)
    return web.json_response({
        "name": name, "namespace": svc.namespace, "mode": modes.get(name, "observe"),
        "revision": await store.revision(),
        "instances": [{"address": i.address, "labels": i.labels} for i in svc.instances],
        "sidecars": [s for s in request.app["sidecars"].listed() if s["service"] == name],
        "policies": [{k: v for k, v in p.items() if k != "doc"} for p in naming(await store.list(), svc)],
    })


async def _traffic(request: web.Request) -> web.Response:
    name = params.service(request.match_info["service"])
    text, window = params.window(request.query)
    mesh = await _mesh(request)
    svc = mesh.services.get(name) if mesh is not None else None
    # the dry-run report compares with the what-if kept in the service's traffic and mTLS documents
    stored = [p["doc"] for p in naming(await request.app["store"].list(), svc)
              if p["kind"] in proposal.KINDS and p["in_force"]] if svc is not None else []
    try:
        found: dict[str, Any] = await request.app[CALLS].read(
            lambda store: service_traffic(store, window, name, stored))
    except (NoData, UnknownService) as e:
        return web.json_response({"window": text, "calls": {"state": "none", "message": str(e)}})
    said = f"{found['n']:,} call records (all observers) in {found['window']}"
    return web.json_response({"window": text, "calls": {"state": "ok", "message": said}, **found})


async def _tail(request: web.Request) -> web.Response:
    q = request.query
    after, status, limit = params.after(q), params.status_class(q), params.limit(q)
    service = params.service(q["service"]) if q.get("service") else ""
    return web.json_response(await request.app[CALLS].read(lambda store: tail(store, after, service, status, limit)))

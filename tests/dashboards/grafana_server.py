"""A small Grafana HTTP API for the provisioning tests: aiohttp in a thread, ephemeral port, in-memory state.

It answers the endpoints grafana-client calls for provisioning, as Grafana does
(status codes and bodies from pkg/api): health, current org (auth check),
plugin settings, datasources by uid/name (create 409 on a taken name or uid;
no plugin check on create, as in Grafana), folders, dashboards/db with
overwrite, dashboards by uid. Every request is recorded.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.app_thread import AppThread


@dataclass
class Recorded:
    method: str
    path: str
    body: Any


@dataclass
class GrafanaState:
    token: str = "good-token"
    basic: tuple[str, str] = ("admin", "secret")
    viewer_token: str = "viewer-token"
    plugins: set[str] = field(default_factory=lambda: {"grafana-clickhouse-datasource", "prometheus"})
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> body
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {dashboard, folderUid, version}
    requests: list[Recorded] = field(default_factory=list)
    next_id: int = 1


BODY = web.RequestKey("body", object)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class FakeGrafana(AppThread):
    """Start with `.start()`, stop with `.stop()`; `.url` is its base URL."""

    def __init__(self) -> None:
        self.state = GrafanaState()
        super().__init__(self.app)

    def writes(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.state.requests if r.method != "GET"]

    # --- the API ---------------------------------------------------------------------

    def _role(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        st = self.state
        if auth == f"Bearer {st.token}":
            return "Admin"
        if auth == f"Bearer {st.viewer_token}":
            return "Viewer"
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if (user, password) == st.basic:
                return "Admin"
        return None

    def app(self) -> web.Application:
        st = self.state

        @web.middleware
        async def record_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.json() if request.can_read_body else None
            st.requests.append(Recorded(request.method, request.path, body))
            request[BODY] = body
            if request.path == "/api/health":
                return await handler(request)
            role = self._role(request)
            if role is None:
                return _error(401, "Unauthorized")
            if role != "Admin" and request.method != "GET":
                return _error(403, "Permission denied")
            return await handler(request)

        async def health(_: web.Request) -> web.Response:
            return web.json_response({"commit": "test", "database": "ok", "version": "12.1.0"})

        async def org(_: web.Request) -> web.Response:
            return web.json_response({"id": 1, "name": "Main Org."})

        async def plugin_settings(request: web.Request) -> web.Response:
            pid = request.match_info["id"]
            if pid not in st.plugins:
                return _error(404, "Plugin not found, no installed plugin with that id")
            return web.json_response({"id": pid, "type": "datasource", "enabled": True})

        async def ds_by_uid(request: web.Request) -> web.Response:
            ds = st.datasources.get(request.match_info["uid"])
            return web.json_response(ds) if ds else _error(404, "Data source not found")

        async def ds_by_name(request: web.Request) -> web.Response:
            ds = next((d for d in st.datasources.values() if d["name"] == request.match_info["name"]), None)
            return web.json_response(ds) if ds else _error(404, "Data source not found")

        async def ds_create(request: web.Request) -> web.Response:
            body = dict(request[BODY])
            if any(d["name"] == body["name"] for d in st.datasources.values()):
                return _error(409, "data source with the same name already exists")
            if body.get("uid") in st.datasources:
                return _error(409, "data source with the same uid already exists")
            body.pop("secureJsonData", None)
            body["id"], st.next_id = st.next_id, st.next_id + 1
            body["version"] = 1
            st.datasources[body["uid"]] = body
            return web.json_response({"message": "Datasource added", "id": body["id"], "name": body["name"],
                                      "datasource": body})

        async def ds_update(request: web.Request) -> web.Response:
            uid = request.match_info["uid"]
            if uid not in st.datasources:
                return _error(404, "Data source not found")
            body = dict(request[BODY])
            body.pop("secureJsonData", None)
            old = st.datasources[uid]
            body.update(id=old["id"], uid=uid, version=old["version"] + 1)
            st.datasources[uid] = body
            return web.json_response({"message": "Datasource updated", "id": body["id"], "name": body["name"],
                                      "datasource": body})

        async def folder_get(request: web.Request) -> web.Response:
            f = st.folders.get(request.match_info["uid"])
            return web.json_response(f) if f else _error(404, "folder not found")

        async def folder_create(request: web.Request) -> web.Response:
            body = request[BODY]
            uid = body.get("uid") or f"f{st.next_id}"
            if uid in st.folders:
                return _error(409, "a folder with the same uid already exists")
            st.folders[uid] = {"uid": uid, "title": body["title"], "id": st.next_id, "version": 1}
            st.next_id += 1
            return web.json_response(st.folders[uid])

        async def dashboard_save(request: web.Request) -> web.Response:
            body = request[BODY]
            dash = body["dashboard"]
            uid = dash["uid"]
            old = st.dashboards.get(uid)
            if old is not None and not body.get("overwrite"):
                return _error(412, "A dashboard with the same uid already exists")
            if body.get("folderUid") and body["folderUid"] not in st.folders:
                return _error(400, "folder not found")
            version = (old["version"] + 1) if old else 1
            st.dashboards[uid] = {"dashboard": dash, "folderUid": body.get("folderUid"), "version": version}
            return web.json_response({"id": 1, "uid": uid, "url": f"/d/{uid}", "status": "success",
                                      "version": version, "slug": uid})

        async def dashboard_get(request: web.Request) -> web.Response:
            d = st.dashboards.get(request.match_info["uid"])
            if d is None:
                return _error(404, "Dashboard not found")
            return web.json_response({"dashboard": d["dashboard"], "meta": {"folderUid": d["folderUid"],
                                                                            "version": d["version"]}})

        app = web.Application(middlewares=[record_and_auth])
        app.router.add_get("/api/health", health)
        app.router.add_get("/api/org", org)
        app.router.add_get("/api/plugins/{id}/settings", plugin_settings)
        app.router.add_get("/api/datasources/uid/{uid}", ds_by_uid)
        app.router.add_get("/api/datasources/name/{name}", ds_by_name)
        app.router.add_post("/api/datasources", ds_create)
        app.router.add_put("/api/datasources/uid/{uid}", ds_update)
        app.router.add_get("/api/folders/{uid}", folder_get)
        app.router.add_post("/api/folders", folder_create)
        app.router.add_post("/api/dashboards/db", dashboard_save)
        app.router.add_get("/api/dashboards/uid/{uid}", dashboard_get)
        return app

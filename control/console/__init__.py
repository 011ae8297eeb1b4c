"""The web console, served by the control plane: its pages and the API reads only it needs.

pages.py serves the page and its scripts (static/), which hold no data and so need no token; endpoints.py the JSON
they read under /v1/console/ (a read token, like every GET of the API), reading the recorded calls through
calls.py (figures.py: the map and a service's analysis; tail.py: the live tail) and the stored policies through
policies.py. A change (a service's mode) goes through the API's own PUT /v1/modes/{service}: audited, refused
without a write token, past the readiness gate, as from the CLI.
"""
from __future__ import annotations

from aiohttp import web

from meshlens.control.console import endpoints, pages
from meshlens.control.console.calls import CallsReader

__all__ = ["PREFIX", "add_routes", "is_page"]

PREFIX = "/console"


def is_page(path: str) -> bool:
    """A page or an asset of the console: served without a token (they hold no data)."""
    return path == PREFIX or path.startswith(PREFIX + "/static/") or path == PREFIX + "/"


def add_routes(app: web.Application) -> None:
    """The console's routes on the control plane's app (its calls read where `app["calls_store"]` says)."""
    app[endpoints.CALLS] = CallsReader(app["calls_store"])
    app.add_routes([
        web.get(PREFIX, pages.index),
        web.get(PREFIX + "/", pages.index),
        web.get(PREFIX + "/static/{name}", pages.static),
        *endpoints.routes(),
    ])

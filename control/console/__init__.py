"""The web console, served by the control plane: its pages and the API reads only it needs."""
from __future__ import annotations

from aiohttp import web

__all__ = ["add_routes", "is_page"]

PREFIX = "/console"


def is_page(path: str) -> bool:
    """A page or an asset of the console: served without a token (they hold no data)."""
    return path == PREFIX or path.startswith(PREFIX + "/static/") or path == PREFIX + "/"


def add_routes(app: web.Application) -> None:
    """The console's routes on the control plane's app."""

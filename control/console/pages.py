"""The console's page and its assets, served from the package (no build step, nothing fetched from elsewhere).

One page (static/index.html) whose scripts route by the URL's fragment (#/map, #/service/NAME, #/tail) and ask the
API with the token the user gave (kept in the tab's sessionStorage). Only the files shipped in static/ are served,
by name (a lookup, never a path joined), each with a Content-Security-Policy that lets the page load nothing and
talk to nothing but this control plane: offline by construction, and a recorded path or a reason shown on the page
can never run as script.
"""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["CSP", "STATIC", "index", "static"]

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}  # no-cache: a new version's assets are asked for again (ETag-less: small)


def _file(name: str) -> web.Response:
    path = _FILES[name]
    return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix], charset="utf-8", headers=_HEADERS)


async def index(request: web.Request) -> web.Response:
    return _file("index.html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES or name == "index.html":
        return web.json_response({"error": f"no console asset {name[:80]!r}"}, status=404, headers=_HEADERS)
    return _file(name)

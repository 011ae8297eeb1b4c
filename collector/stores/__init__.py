"""Stores by URL: `chdb:PATH` (embedded, default), `clickhouse://…` (native), `http(s)://…`."""
from __future__ import annotations

import os
import urllib.request
from urllib.parse import parse_qs, unquote, urlsplit

from meshlens.collector.stores.base import (MIN_VERSION, Store, StoreError, StoreUnavailable,
                                   UnsupportedServer, redact)
from meshlens.collector.stores.embedded import default_data_dir

__all__ = ["MIN_VERSION", "Store", "StoreError", "StoreUnavailable", "UnsupportedServer",
           "StoreURLError", "connect", "default_store_url", "reader_store_url", "redact", "parse_store_url"]

DEFAULT_DATABASE = "meshlens"
# Where a local collector serves queries over the embedded store (its default query port).
COLLECTOR_QUERY_URL = "http://127.0.0.1:8123/"


class StoreURLError(ValueError):
    """The --store URL cannot be used; the message says why and what would work."""


HELP = "use chdb:PATH, clickhouse://user:pass@host:9000/db or http://host:8123/?database=db"


def default_store_url() -> str:
    return f"chdb:{default_data_dir()}"


def reader_store_url() -> str:
    """The store a reader should use: MESHLENS_STORE, else the local collector if it answers, else embedded.

    Only one process may open the embedded store's directory (the collector), so readers ask
    the collector's query endpoint first.
    """
    if os.environ.get("MESHLENS_STORE"):
        return os.environ["MESHLENS_STORE"]
    try:
        with urllib.request.urlopen(COLLECTOR_QUERY_URL + "ping", timeout=0.5) as resp:
            if resp.status == 200:
                return COLLECTOR_QUERY_URL
    except OSError:
        pass
    return default_store_url()


def parse_store_url(url: str) -> dict:
    """Split a store URL into its parts, or raise StoreURLError naming what is wrong."""
    if not url or not isinstance(url, str):
        raise StoreURLError(f"empty store URL: {HELP}")
    if url.startswith("chdb:"):
        path = url[len("chdb:"):]
        if path.startswith("//"):
            path = path[2:]
        path, _, query = path.partition("?")
        opts = parse_qs(query)
        return {"scheme": "chdb", "path": path or str(default_data_dir()),
                "database": opts.get("database", [DEFAULT_DATABASE])[0], "cluster": ""}
    parts = urlsplit(url)
    if parts.scheme not in ("clickhouse", "clickhouses", "http", "https"):
        raise StoreURLError(f"unknown store scheme {parts.scheme or url!r}: {HELP}")
    try:
        port = parts.port
    except ValueError:
        raise StoreURLError(f"invalid port in store URL {redact(url)!r}") from None
    if not parts.hostname:
        raise StoreURLError(f"no host in store URL {redact(url)!r}: {HELP}")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    native = parts.scheme.startswith("clickhouse")
    # The native protocol names the database in the path; HTTP only in ?database=.
    path_db = parts.path.strip("/") if native else ""
    database = opts.pop("database", "") or path_db or DEFAULT_DATABASE
    cluster = opts.pop("cluster", "")
    secure = parts.scheme in ("clickhouses", "https") or opts.pop("secure", "") in ("1", "true")
    default_port = (9440 if secure else 9000) if native else (8443 if secure else 8123)
    return {
        "scheme": "native" if native else "http", "host": parts.hostname, "port": port or default_port,
        "user": unquote(parts.username or ""), "password": unquote(parts.password or ""),
        "database": database, "cluster": cluster, "secure": secure,
        "path": "" if native else (parts.path or "/"),
    }


def connect(url: str) -> Store:
    """Open a store without checking its version or schema (meshlens.collector.service.open_store checks both)."""
    p = parse_store_url(url)
    if p["scheme"] == "chdb":
        from meshlens.collector.stores.embedded import EmbeddedStore

        return EmbeddedStore(p["path"], p["database"])
    if p["scheme"] == "native":
        from meshlens.collector.stores.native import NativeStore

        return NativeStore(url, p["host"], p["port"], p["user"], p["password"],
                           p["database"], p["cluster"], p["secure"])
    from meshlens.collector.stores.http import HttpStore

    base = f"{'https' if p['secure'] else 'http'}://{p['host']}:{p['port']}{p['path'] or '/'}"
    return HttpStore(url, base, p["user"], p["password"], p["database"], p["cluster"])

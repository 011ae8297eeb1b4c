"""A writable ClickHouse HTTP interface over chdb, run as a separate process: a store that tests can take down.

Real chdb and real HTTP, speaking just enough of the interface for
collector.stores.http.HttpStore (queries, DDL, INSERT … FORMAT ArrowStream).
Usage: python tests/writable_chdb_server.py DATA_DIR PORT
"""
from __future__ import annotations

import re
import sys

import pyarrow as pa
from aiohttp import web
from chdb import session

INSERT = re.compile(r"^\s*(INSERT INTO .*?)\s+FORMAT\s+ArrowStream\s*$", re.I | re.S)


def main(data_dir: str, port: int) -> None:
    sess = session.Session(data_dir)

    async def handle(request: web.Request) -> web.Response:
        params = request.query
        body = await request.read()
        sql = params.get("query")
        fmt = params.get("default_format", "TabSeparated")
        settings = {k: v for k, v in params.items()
                    if k in ("insert_deduplication_token", "materialize_ttl_after_modify")}
        clause = (" SETTINGS " + ", ".join(f"{k}='{v}'" for k, v in settings.items())) if settings else ""
        try:
            if sql and INSERT.match(sql):
                batch = pa.ipc.open_stream(body).read_all()  # noqa: F841 - read by Python(batch)
                sess.query(f"{INSERT.match(sql).group(1)} SELECT * FROM Python(batch){clause}")
                return web.Response(body=b"")
            text = sql if sql is not None else body.decode()
            if clause and text.lstrip().upper().startswith("ALTER"):
                sess.query("SET materialize_ttl_after_modify = 0")
                clause = ""
            res = sess.query(text + clause, fmt)
            return web.Response(body=res.bytes() if res is not None else b"")
        except Exception as e:  # the ClickHouse error text, as a server would send it
            return web.Response(status=500, text=str(e).splitlines()[0])

    app = web.Application(client_max_size=256 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: print("ready", flush=True))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

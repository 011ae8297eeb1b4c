"""Call records from two sidecars (client -> server) arrive in a real collector and match the wire."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from meshlens.collector.stores import connect
from tests.collector_process import CollectorProcess
from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess, SampleService
from tests.waiting import PATIENCE_S

COLUMNS = ("observer", "trace_id", "span_id", "parent_span_id", "src_service", "dst_service", "method", "path",
           "authority", "status", "request_bytes", "response_bytes", "error", "response_flags", "protocol", "mode",
           "attributes")


def curl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", f"{PATIENCE_S:g}", *args], input=input, capture_output=True,
                          timeout=PATIENCE_S + 30)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """collector; sidecar B (backend, inbound to the sample app); sidecar A (web, outbound to B)."""
    tmp = tmp_path_factory.mktemp("recording")
    col = CollectorProcess(tmp / "collector").start()
    app = SampleService().start()
    started: list[ProxyProcess] = []
    try:
        url = f"{col.base}/v1/calls"
        b = ProxyProcess(tmp / "b", json.dumps({"services": {"backend": {}}}), "backend",
                         "--app-port", str(app.port), "--collector", url)
        started.append(b.start())
        mesh_a = {"services": {"web": {}, "backend": {"instances": [f"127.0.0.1:{b.inbound}"]},
                               "dead": {"instances": [f"127.0.0.1:{free_port()}"]}}}
        a = ProxyProcess(tmp / "a", json.dumps(mesh_a), "web", "--collector", url)
        started.append(a.start())
        yield col, a, b
    finally:
        for p in started:
            p.stop()
            p.kill()
        app.stop()
        col.stop()
        col.kill()


def test_records_from_both_sidecars_match_what_the_client_saw(chain):
    col, a, b = chain
    out = f"http://127.0.0.1:{a.outbound}"
    got = curl("-D", "/dev/stderr", "-H", "Host: backend", f"{out}/hello?x=1")
    assert got.stdout == b"hello\n"
    body = b"q" * 12345
    assert curl("-H", "Host: backend", "--data-binary", "@-", f"{out}/echo", input=body).stdout == body
    assert curl("-x", out, "-I", "http://backend/hello").stdout.startswith(b"HTTP/1.1 200")
    assert curl("-H", "Host: dead", f"{out}/gone").stdout.startswith(b"upstream connect error")
    curl("-H", "Host: backend", f"{out}/reset")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert curl("-H", f"traceparent: {tp}", "-H", "Host: backend", f"{out}/hello").stdout == b"hello\n"
    for p in (a, b):
        assert p.stop() == 0  # SIGTERM drains and flushes the recorder

    store = connect(col.query_url)
    try:
        def rows():
            return store.query_rows(f"SELECT {', '.join(COLUMNS)} FROM meshlens.calls ORDER BY time")
        deadline = time.monotonic() + PATIENCE_S
        while len(rows()) < 11 and time.monotonic() < deadline:
            time.sleep(0.3)
        calls = [dict(zip(COLUMNS, r)) for r in rows()]
    finally:
        store.close()
    client = [c for c in calls if c["observer"] == "client"]
    server = [c for c in calls if c["observer"] == "server"]
    assert len(client) == 6 and len(server) == 5, calls

    by_path = {c["path"]: c for c in client if c["path"] != "/hello" or c["method"] == "GET"}
    hello = [c for c in client if c["path"] == "/hello" and c["method"] == "GET"][0]
    assert hello["status"] == 200 and hello["response_bytes"] == 6 and hello["authority"] == "backend"
    assert hello["src_service"] == "web" and hello["dst_service"] == "backend" and hello["protocol"] == "http/1.1"
    assert hello["mode"] == "observe" and hello["attributes"]["x_request_id"]
    echo = by_path["/echo"]
    assert (echo["method"], echo["status"], echo["request_bytes"], echo["response_bytes"]) == ("POST", 200, 12345, 12345)
    head = [c for c in client if c["method"] == "HEAD"][0]
    assert head["status"] == 200 and head["response_bytes"] == 0
    gone = by_path["/gone"]
    assert (gone["status"], gone["error"], gone["response_flags"], gone["dst_service"]) == (503, "refused", "UF", "dead")
    assert (by_path["/reset"]["error"], by_path["/reset"]["response_flags"]) == ("reset", "UC")
    assert (hello["response_flags"], echo["response_flags"]) == ("", "")

    # one trace across the two sidecars: the server's parent is the client's span
    for c in client:
        if c["error"] == "refused":
            continue
        s = [s for s in server if s["trace_id"] == c["trace_id"]]
        assert len(s) == 1, (c, server)
        s = s[0]
        assert s["parent_span_id"] == c["span_id"] and s["method"] == c["method"] and s["path"] == c["path"]
        assert s["dst_service"] == "backend" and s["attributes"]["x_request_id"] == c["attributes"]["x_request_id"]
        if c["path"] != "/reset":
            assert (s["status"], s["request_bytes"], s["response_bytes"]) == (c["status"], c["request_bytes"], c["response_bytes"])
    continued = [c for c in client if c["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"]
    assert len(continued) == 1 and continued[0]["parent_span_id"] == "00f067aa0ba902b7"
    assert [s for s in server if s["path"] == "/reset"][0]["error"] == "reset"

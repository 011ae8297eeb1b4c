"""The control plane's changes in the collector: the body of /v1/changes read as transcripts, the endpoint of a
real collector (bad bodies, resends, hypothesis), and one row a change for readers on every store backend."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector.changes import (CHANGE_COLUMN_NAMES, MAX_CHANGES, MAX_DOCUMENT_BYTES, ChangeFormatError,
                                        MeshChange, change_id, decode)
from meshlens.collector.columns import to_table
from meshlens.collector.ingest import Ingest
from meshlens.collector.metrics import CollectorMetrics
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.spool import Spool
from meshlens.collector.stores import Store, connect
from tests.clickhouse_server import ClickHouseServer, free_port
from tests.collector_process import CollectorProcess
from tests.waiting import PATIENCE_S, wait_until

WRITABLE_SERVER = Path(__file__).resolve().parents[1] / "writable_chdb_server.py"
http = urllib3.PoolManager(retries=False, timeout=PATIENCE_S)

MODE_DOC = {"apiVersion": "meshlens.io/v1alpha1", "kind": "Mode", "metadata": {"name": "payment-service"},
            "spec": {"mode": "dry-run"}}


def change(**fields: Any) -> dict[str, Any]:
    """A change as the control plane ships it: a mode switch, now (the table's TTL drops old rows), with `fields`
    replaced."""
    base = MeshChange(time=time.time_ns(), revision=42, who="ana", kind="Mode", name="payment-service",
                      service="payment-service", action="configured", from_mode="observe", to_mode="dry-run",
                      before={**MODE_DOC, "spec": {"mode": "observe"}}, after=MODE_DOC, reason="try the retries",
                      control_id="cp-1:15010").as_json()
    return {**base, **fields}


def body(*changes: dict[str, Any]) -> bytes:
    return json.dumps({"changes": list(changes)}).encode()


# -- the body, as transcripts -------------------------------------------------------------------------

def test_a_change_is_every_column_with_its_documents_as_compact_json() -> None:
    [row] = decode(body(change()))
    assert list(row) == list(CHANGE_COLUMN_NAMES)
    assert (row["revision"], row["kind"], row["from_mode"], row["to_mode"]) == (42, "Mode", "observe", "dry-run")
    assert row["after"] == json.dumps(MODE_DOC, sort_keys=True, separators=(",", ":"))
    assert json.loads(row["before"])["spec"] == {"mode": "observe"}


def test_optional_fields_default_and_a_missing_document_is_empty() -> None:
    required = {k: change()[k] for k in ("time", "revision", "who", "kind", "name", "action", "control_id")}
    [row] = decode(body({**required, "kind": "Mesh", "name": "mesh", "action": "deleted", "after": None}))
    assert (row["service"], row["from_mode"], row["to_mode"], row["before"], row["after"], row["reason"]) == (
        "", "", "", "", "", "")
    assert decode(body()) == []


@pytest.mark.parametrize("wire, message", [
    (b"", "invalid JSON: Expecting value"),
    (b"\xff", "invalid JSON: 'utf-8' codec can't decode"),
    (b"[1]", 'expected a JSON object {"changes": [...]}'),
    (b'{"changes": [], "more": 1}', 'expected a JSON object {"changes": [...]}'),
    (b'{"changes": {}}', "changes must be a list"),
    (b'{"changes": [1]}', "changes[0] must be an object"),
    (body(change(extra=1)), "changes[0]: unknown field 'extra'"),
    (body({k: v for k, v in change().items() if k != "revision"}), "changes[0]: revision is required"),
    (body(change(), change(revision=0)), "changes[1].revision must be a whole number from 1 to"),
    (body(change(revision=2**63)), "changes[0].revision must be a whole number from 1 to"),
    (body(change(revision=True)), "changes[0].revision must be a whole number"),
    (body(change(time=1.5)), "changes[0].time must be a whole number from 0 to"),
    (body(change(time=-1)), "changes[0].time must be a whole number from 0 to"),
    (body(change(who=None)), "changes[0].who must be a string"),
    (body(change(who=7)), "changes[0].who must be a string"),
    (body(change(who="x" * 257)), "changes[0].who is longer than 256 characters"),
    (body(change(reason="x" * 4097)), "changes[0].reason is longer than 4096 characters"),
    (body(change(action="changed")), "changes[0].action must be one of 'created', 'configured', 'deleted'"),
    (body(change(to_mode="enforcing")), "changes[0].to_mode must be one of '', 'observe', 'dry-run', 'enforce'"),
    (body(change(after="{}")), "changes[0].after must be the document (an object) or null"),
    (body(change(after={"spec": "x" * MAX_DOCUMENT_BYTES})), f"changes[0].after is larger than {MAX_DOCUMENT_BYTES}"),
    (body(*[change()] * (MAX_CHANGES + 1)), f"{MAX_CHANGES + 1} changes in one request: at most {MAX_CHANGES}"),
    (b'{"changes": [{"time": NaN}]}', "invalid JSON: NaN is not a number JSON has"),
    (b'{"changes": [' + body(change())[13:-2].replace(b'"ana"', b'"\\ud800"') + b"]}",
     "changes[0].who holds a lone surrogate"),
    (b'{"changes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid JSON: nested too deeply"),
], ids=lambda v: v[:40].decode("utf-8", "replace") if isinstance(v, bytes) else None)
def test_a_body_we_cannot_store_is_refused_in_one_line_naming_what(wire: bytes, message: str) -> None:
    with pytest.raises(ChangeFormatError) as err:
        decode(wire)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_change_has_one_id_whoever_sends_it_and_whatever_its_name_holds() -> None:
    assert change_id(42, 7, "Mode", "pay") == change_id(42, 7, "Mode", "pay") != change_id(42, 8, "Mode", "pay")
    assert change_id(1, 2, "a\0b", "c") != change_id(1, 2, "a", "b\0c")
    odd = change_id(1, 2, "VirtualService", "ns/x\nwith a newline")
    assert odd.startswith("change-") and odd.isprintable() and len(odd) == 39


# -- the endpoint of a real collector ---------------------------------------------------------------

@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    with CollectorProcess(tmp_path_factory.mktemp("collector"), None, "--max-body-bytes", str(8 << 20)) as c:
        yield c


def post(col: CollectorProcess, data: bytes, content_type: str = "application/json",
         **headers: str) -> tuple[int, dict[str, Any]]:
    r = http.request("POST", f"{col.base}/v1/changes", body=data, headers={"Content-Type": content_type, **headers})
    return r.status, json.loads(r.data)


def rows(col: CollectorProcess, sql: str) -> list[tuple]:
    store = connect(col.query_url)
    try:
        return store.query_rows(sql)
    finally:
        store.close()


def test_changes_are_stored_once_however_often_they_come(collector: CollectorProcess) -> None:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    first, second = change(name=name, service=name, revision=1), change(name=name, service=name, revision=2)
    assert post(collector, body(first, second)) == (200, {"accepted": 2, "duplicates": 0})
    assert post(collector, body(second)) == (200, {"accepted": 1, "duplicates": 1})  # a resend
    assert post(collector, body(first, second), "application/json; charset=utf-8") == (
        200, {"accepted": 2, "duplicates": 2})
    sql = ("SELECT revision, toUnixTimestamp64Nano(time), who, action, from_mode, to_mode, after, control_id "
           f"FROM meshlens.mesh_changes WHERE name = '{name}' ORDER BY revision")
    wait_until(lambda: len(rows(collector, sql)) >= 2, "the changes are stored")
    after = json.dumps(MODE_DOC, sort_keys=True, separators=(",", ":"))
    assert rows(collector, sql) == [(1, first["time"], "ana", "configured", "observe", "dry-run", after, "cp-1:15010"),
                                    (2, second["time"], "ana", "configured", "observe", "dry-run", after, "cp-1:15010")]


def test_a_gzipped_body_is_taken(collector: CollectorProcess) -> None:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    assert post(collector, gzip.compress(body(change(name=name))), **{"Content-Encoding": "gzip"}) == (
        200, {"accepted": 1, "duplicates": 0})


@pytest.mark.parametrize("data, content_type, status, message", [
    (b"{}", "application/json", 400, 'expected a JSON object {"changes": [...]}'),
    (body(change(action="x")), "application/json", 400, "changes[0].action must be one of"),
    (body(change()), "text/plain", 415, "unsupported Content-Type 'text/plain': use application/json"),
    (body(change()), "application/x-meshlens-calls+json", 415, "unsupported Content-Type"),
    (b"x" * (9 << 20), "application/json", 413, f"body larger than {8 << 20} bytes"),
])
def test_a_bad_body_is_a_one_line_answer_and_the_collector_keeps_serving(collector: CollectorProcess, data: bytes,
                                                                        content_type: str, status: int,
                                                                        message: str) -> None:
    got_status, answer = post(collector, data, content_type)
    assert got_status == status and answer["error"].startswith(message) and "\n" not in answer["error"]
    assert http.request("GET", f"{collector.base}/healthz").status == 200
    assert post(collector, body(change(name=f"svc-{uuid.uuid4().hex[:8]}")))[0] == 200


def test_a_body_refused_whole_stores_none_of_its_changes(collector: CollectorProcess) -> None:
    name = f"svc-{uuid.uuid4().hex[:8]}"
    status, _ = post(collector, body(change(name=name), change(name=name, revision=43, who=7)))
    assert status == 400
    assert post(collector, body(change(name=name, revision=44))) == (200, {"accepted": 1, "duplicates": 0})
    wait_until(lambda: rows(collector, f"SELECT revision FROM meshlens.mesh_changes WHERE name = '{name}'"),
               "the change after it is stored")
    assert rows(collector, f"SELECT revision FROM meshlens.mesh_changes WHERE name = '{name}'") == [(44,)]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@st.composite
def one_field_wrong(draw: st.DrawFn) -> bytes:
    """A real change with one field replaced, removed or added: what a buggy or newer control plane might send."""
    c = change(name=f"fuzz-{draw(st.integers(0, 10**6))}")
    name = draw(st.sampled_from([*CHANGE_COLUMN_NAMES, "extra"]))
    if draw(st.booleans()) and name in c:
        del c[name]
    else:
        c[name] = draw(JSON)
    return body(c)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                      st.lists(JSON, max_size=3).map(lambda cs: json.dumps({"changes": cs}).encode()),
                      one_field_wrong()),
       gzipped=st.booleans())
def test_fuzz_any_body_is_taken_or_refused_in_one_line_and_the_collector_keeps_serving(
        collector: CollectorProcess, data: bytes, gzipped: bool) -> None:
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    status, answer = post(collector, gzip.compress(data) if gzipped else data, **headers)
    if status == 200:
        assert set(answer) == {"accepted", "duplicates"}
    else:
        assert status == 400 and "\n" not in answer["error"] and answer["error"], (status, answer)
    assert http.request("GET", f"{collector.base}/healthz").status == 200


# -- one row a change for readers, on every backend --------------------------------------------------

@pytest.fixture(params=["embedded", "http"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store: chdb in this process, or chdb behind the ClickHouse HTTP interface in its own."""
    if request.param == "embedded":
        s = connect(f"chdb:{tmp_path / 'chdb'}")
        try:
            migrate(s, Layout())
            yield s
        finally:
            s.close()
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, str(WRITABLE_SERVER), str(tmp_path / "store"), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None and b"ready" in server.stdout.readline()
        s = connect(f"http://127.0.0.1:{port}/?database=meshlens")
        try:
            migrate(s, Layout())
            yield s
        finally:
            s.close()
    finally:
        server.terminate()
        server.wait(30)


def ingested(store: Store, tmp_path: Path, name: str, changes: list[dict[str, Any]]) -> None:
    """`changes` through a collector's spool of its own into `store`, as the /v1/changes endpoint submits them."""
    ingest = Ingest(store, Spool(tmp_path / name, 1 << 30), "meshlens", CollectorMetrics())
    for row in decode(body(*changes)):
        ingest.submit({"mesh_changes": to_table("mesh_changes", {k: [v] for k, v in row.items()})}, "changes",
                      change_id(row["revision"], row["time"], row["kind"], row["name"]))
    ingest.stop(drain_timeout=PATIENCE_S)  # seals and inserts what was taken
    assert ingest.spool.depth_bytes == 0


def test_one_change_shipped_through_two_collectors_reads_as_one_row_with_final(store: Store, tmp_path: Path) -> None:
    now = time.time_ns()  # recent: the table's TTL drops old rows
    trail = [change(time=now, revision=1, name="web", service="web"), change(time=now + 1, revision=2)]
    ingested(store, tmp_path, "spool-a", trail)
    ingested(store, tmp_path, "spool-b", [{**c, "control_id": "cp-2:15010"} for c in trail])  # the other replica

    assert store.query_rows("SELECT count() FROM meshlens.mesh_changes") == [(4,)]  # until parts merge
    final = store.query_rows("SELECT revision, name, from_mode, to_mode FROM meshlens.mesh_changes FINAL "
                             "ORDER BY revision")
    assert final == [(1, "web", "observe", "dry-run"), (2, "payment-service", "observe", "dry-run")]

    # A change of another mesh (or of a store created anew) with the same revision is another row.
    ingested(store, tmp_path, "spool-c", [change(time=now + 5, revision=1, name="web")])
    assert store.query_rows("SELECT count() FROM meshlens.mesh_changes FINAL WHERE revision = 1") == [(2,)]
    store.command("OPTIMIZE TABLE meshlens.mesh_changes FINAL")  # what a merge does, now
    assert store.query_rows("SELECT count() FROM meshlens.mesh_changes") == [(3,)]


def test_over_the_native_protocol_the_rows_insert_and_fold_with_final(request: pytest.FixtureRequest) -> None:
    """Debian's server (18.16) is older than MIN_VERSION: it has no DateTime64, codecs or TTL, so migration 4
    cannot run there. What the native path adds is checked on a table of the same columns in its types: our
    rows (times as integers, as NativeStore sends them) insert, and a change inserted twice reads once with FINAL."""
    server: ClickHouseServer = request.getfixturevalue("clickhouse_server")
    db = f"t_{uuid.uuid4().hex[:12]}"
    store = connect(server.native_url(db))
    try:
        store.command(f"CREATE DATABASE {db}")
        columns = ", ".join(f"`{c}` {'UInt64' if c in ('time', 'revision') else 'String'}" for c in CHANGE_COLUMN_NAMES)
        store.command(f"CREATE TABLE {db}.mesh_changes ({columns}) ENGINE = ReplacingMergeTree() "
                      "PARTITION BY intDiv(time, 2592000000000000) ORDER BY (revision, kind, name, time)")
        [row] = decode(body(change(time=time.time_ns())))
        table = to_table("mesh_changes", {k: [v] for k, v in row.items()})
        store.insert(f"{db}.mesh_changes", table, "replica-a")
        store.insert(f"{db}.mesh_changes", table, "replica-b")
        assert store.query_rows(f"SELECT count() FROM {db}.mesh_changes FINAL") == [(1,)]
        assert store.query_rows(f"SELECT time, revision, to_mode, after FROM {db}.mesh_changes FINAL") == [
            (row["time"], 42, "dry-run", row["after"])]
        store.command(f"DROP DATABASE {db}")
    finally:
        store.close()

"""The control plane's SQLite store: revisions, the audit trail, all-or-nothing changes, waiting for a change."""
from __future__ import annotations

import asyncio

import pytest

from meshlens.control.resources import ResourceError, mode_resource, parse_documents
from meshlens.control.store import Change, SqliteStore, StoreURLError, open_store

MESH = "services:\n  pay: {}\n  web: {}\n"
VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: production}
spec: {hosts: [pay]}
"""


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "c.db")
    yield s
    s.close()


def test_a_change_gets_a_revision_and_an_audit_entry_with_who_what_and_why(store):
    [(mesh, action)] = store.put(parse_documents(MESH, "mesh.yaml"), Change("ana", "first mesh"))
    assert (mesh.kind, mesh.name, mesh.revision, action) == ("Mesh", "mesh", 1, "created")
    [(vs, action)] = store.put(parse_documents(VS, "vs.yaml"), Change("bo"))
    assert (vs.name, vs.revision, action) == ("production/pay", 2, "created")
    [entry] = store.history(name="production/pay")
    assert (entry.revision, entry.who, entry.action, entry.before, entry.reason) == (2, "bo", "created", None, "")
    assert entry.after == parse_documents(VS, "vs.yaml")[0].doc
    assert store.get("VirtualService", "production/pay").doc["spec"] == {"hosts": ["pay"]}


def test_the_same_document_again_changes_nothing_and_writes_no_entry(store):
    store.put(parse_documents(VS, "vs.yaml"), Change("ana"))
    [(res, action)] = store.put(parse_documents(VS, "vs.yaml"), Change("ana"))
    assert (action, res.revision, store.revision(), len(store.history())) == ("unchanged", 1, 1, 1)


def test_an_update_and_a_delete_are_audited_from_and_to(store):
    store.put([mode_resource("pay", "observe")], Change("ana"))
    [(res, action)] = store.put([mode_resource("pay", "dry-run")], Change("ana", "try the retries"))
    assert action == "configured" and res.revision == 2
    assert store.delete("Mode", "pay", Change("bo", "done")) == 3
    assert store.delete("Mode", "pay", Change("bo")) is None  # nothing left: no entry
    update, delete = store.history(kind="Mode")[1:]
    assert (update.before["spec"], update.after["spec"], update.reason) == ({"mode": "observe"}, {"mode": "dry-run"},
                                                                             "try the retries")
    assert (delete.action, delete.before["spec"], delete.after, delete.who) == ("deleted", {"mode": "dry-run"}, None, "bo")
    assert store.get("Mode", "pay") is None and store.revision() == 3


def test_history_of_a_service_takes_its_resources_in_every_namespace_and_nothing_else(store):
    store.put(parse_documents(MESH + "---\n" + VS, "all.yaml"), Change("ana"))
    store.put([mode_resource("pay", "enforce"), mode_resource("web", "dry-run")], Change("ana"))
    store.put(parse_documents(VS.replace("name: pay", "name: payx"), "other.yaml"), Change("ana"))  # not pay's
    names = [(e.kind, e.name) for e in store.history(service="pay")]
    assert names == [("VirtualService", "production/pay"), ("Mode", "pay")]


def test_revisions_survive_a_restart_and_keep_growing(tmp_path):
    s = SqliteStore(tmp_path / "c.db")
    s.put([mode_resource("pay", "dry-run")], Change("ana"))
    s.close()
    s = SqliteStore(tmp_path / "c.db")
    try:
        assert s.get("Mode", "pay").doc["spec"] == {"mode": "dry-run"} and s.revision() == 1
        [(res, _)] = s.put([mode_resource("pay", "enforce")], Change("ana"))
        assert res.revision == 2
    finally:
        s.close()


def test_a_batch_is_stored_whole_or_not_at_all(store, monkeypatch):
    docs = parse_documents(MESH + "---\n" + VS, "all.yaml")
    real = store._db

    class Failing:  # the second resource's write fails: the first must not stay
        def __init__(self):
            self.inserts = 0

        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE"):
                self.inserts += 1
                if self.inserts == 2:
                    raise OSError("disk full")
            return real.execute(sql, *args)

    monkeypatch.setattr(store, "_db", Failing())
    with pytest.raises(OSError):
        store.put(docs, Change("ana"))
    monkeypatch.setattr(store, "_db", real)
    assert store.list() == [] and store.revision() == 0 and store.history() == []


def test_a_waiter_wakes_on_the_next_change_and_a_timeout_returns_the_revision(store):
    async def main():
        waiting = asyncio.ensure_future(store.wait(0, 30))
        await asyncio.sleep(0)
        assert not waiting.done()
        store.put([mode_resource("pay", "dry-run")], Change("ana"))
        assert await waiting == 1
        assert await store.wait(0, 30) == 1  # already past: at once
        assert await store.wait(1, 0.01) == 1  # nothing new: the current revision when the time is up

    asyncio.run(main())


@pytest.mark.parametrize("url, message", [
    ("sqlite:", "needs a path"),
    ("etcd://127.0.0.1:2379", "not available yet"),
    ("postgres://x", "unknown store URL"),
])
def test_store_urls_that_name_nothing_we_can_open_say_so(url, message):
    with pytest.raises(StoreURLError, match=message):
        open_store(url)


def test_a_store_path_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreURLError, match="cannot open store"):
        open_store(f"sqlite:{tmp_path / 'file' / 'c.db'}")


def test_a_mode_that_does_not_exist_is_refused_before_the_store():
    with pytest.raises(ResourceError, match="observe | dry-run | enforce"):
        mode_resource("pay", "enforcing")

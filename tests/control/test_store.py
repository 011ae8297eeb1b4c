"""The control plane's stores, SQLite and a real three-member etcd cluster, held to the same contract:
revisions that only grow, the audit trail, all-or-nothing changes, waiting for a change."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from meshlens.policy.resources import ResourceError, mode_resource, parse_documents
from meshlens.control.store import Change, SqliteStore, Stale, StoreUnavailable, StoreURLError, open_store
from tests.control.etcd_cluster import EtcdCluster

MESH = "services:\n  pay: {}\n  web: {}\n"
VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: production}
spec: {hosts: [pay]}
"""


class Sync:
    """A store's coroutines run to completion on one loop of its own (etcd's client is bound to its loop)."""

    def __init__(self, store) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name):
        method = getattr(self.store, name)
        return lambda *a, **kw: self.loop.run_until_complete(method(*a, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Sync(SqliteStore(tmp_path / "c.db"))
    else:
        cluster = request.getfixturevalue("etcd")
        subprocess.run(["etcdctl", "--endpoints", cluster.url[len("etcd://"):], "del", "--prefix", "/meshlens/"],
                       env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, check=True, capture_output=True)
        s = Sync(open_store(cluster.url))
        s.open()
    yield s
    s.close()


def test_a_change_gets_a_revision_and_an_audit_entry_with_who_what_and_why(store):
    [(mesh, action)] = store.put(parse_documents(MESH, "mesh.yaml"), Change("ana", "first mesh"))
    assert (mesh.kind, mesh.name, action) == ("Mesh", "mesh", "created")
    [(vs, action)] = store.put(parse_documents(VS, "vs.yaml"), Change("bo"))
    assert (vs.name, action) == ("production/pay", "created") and vs.revision > mesh.revision
    assert store.revision() == vs.revision
    [entry] = store.history(name="production/pay")
    assert (entry.revision, entry.who, entry.action, entry.before, entry.reason) == (vs.revision, "bo", "created", None, "")
    assert entry.after == parse_documents(VS, "vs.yaml")[0].doc
    got = store.get("VirtualService", "production/pay")
    assert got.doc["spec"] == {"hosts": ["pay"]} and got.revision == vs.revision


def test_the_same_document_again_changes_nothing_and_writes_no_entry(store):
    [(first, _)] = store.put(parse_documents(VS, "vs.yaml"), Change("ana"))
    [(res, action)] = store.put(parse_documents(VS, "vs.yaml"), Change("ana"))
    assert (action, res.revision, store.revision(), len(store.history())) == ("unchanged", first.revision,
                                                                              first.revision, 1)


def test_a_change_decided_on_a_read_is_stored_only_if_what_was_read_is_unchanged(store):
    """Store.put's `expect`: a compare-and-set (the guard's rollback), on both stores."""
    [(mode, _)] = store.put([mode_resource("pay", "enforce")], Change("ana"))
    [(later, _)] = store.put([mode_resource("pay", "observe")], Change("bo", "by hand, meanwhile"))
    with pytest.raises(Stale, match="Mode pay changed since revision"):
        store.put([mode_resource("pay", "dry-run")], Change("meshlens-guard"), {("Mode", "pay"): mode.revision})
    with pytest.raises(Stale):
        store.put([mode_resource("pay", "dry-run")], Change("meshlens-guard"), {("Mode", "gone"): 1})
    assert store.get("Mode", "pay").doc["spec"]["mode"] == "observe" and store.revision() == later.revision
    [(done, action)] = store.put([mode_resource("pay", "dry-run")], Change("g"), {("Mode", "pay"): later.revision})
    assert action == "configured" and done.revision > later.revision


def test_an_update_and_a_delete_are_audited_from_and_to(store):
    store.put([mode_resource("pay", "observe")], Change("ana"))
    [(res, action)] = store.put([mode_resource("pay", "dry-run")], Change("ana", "try the retries"))
    assert action == "configured"
    deleted = store.delete("Mode", "pay", Change("bo", "done"))
    assert deleted > res.revision
    assert store.delete("Mode", "pay", Change("bo")) is None  # nothing left: no entry
    update, delete = store.history(kind="Mode")[1:]
    assert (update.before["spec"], update.after["spec"], update.reason) == ({"mode": "observe"}, {"mode": "dry-run"},
                                                                             "try the retries")
    assert (delete.revision, delete.action, delete.before["spec"], delete.after, delete.who) == (
        deleted, "deleted", {"mode": "dry-run"}, None, "bo")
    assert store.get("Mode", "pay") is None and store.revision() == deleted and store.list() == []


def test_history_of_a_service_takes_its_resources_in_every_namespace_and_nothing_else(store):
    store.put(parse_documents(MESH + "---\n" + VS, "all.yaml"), Change("ana"))
    store.put([mode_resource("pay", "enforce"), mode_resource("web", "dry-run")], Change("ana"))
    store.put(parse_documents(VS.replace("name: pay", "name: payx"), "other.yaml"), Change("ana"))  # not pay's
    names = [(e.kind, e.name) for e in store.history(service="pay")]
    assert names == [("VirtualService", "production/pay"), ("Mode", "pay")]
    assert [e.name for e in store.history(limit=1)] == ["production/payx"]  # the newest


def test_everything_is_read_at_one_revision(store):
    store.put(parse_documents(MESH + "---\n" + VS, "all.yaml"), Change("ana"))
    revision, resources = store.everything()
    assert revision == store.revision() and sorted(r.key for r in resources) == [
        ("Mesh", "mesh"), ("VirtualService", "production/pay")]


def test_changes_after_a_revision_come_oldest_first_in_whole_revisions(store):
    store.put(parse_documents(MESH + "---\n" + VS, "all.yaml"), Change("ana"))  # one revision on etcd, two on SQLite
    store.put([mode_resource("pay", "dry-run")], Change("bo", "try"))
    deleted = store.delete("Mode", "pay", Change("bo"))

    trail = store.changes_after(0, 100)
    assert [(e.kind, e.name, e.action) for e in trail] == [
        ("Mesh", "mesh", "created"), ("VirtualService", "production/pay", "created"), ("Mode", "pay", "created"),
        ("Mode", "pay", "deleted")]
    assert trail == store.history() and trail[-1].revision == deleted
    assert store.changes_after(deleted, 100) == []
    assert store.changes_after(trail[1].revision, 100) == trail[2:]
    for limit in (1, 2, 3):  # never a revision cut in two: the rest of its entries come along
        got = store.changes_after(0, limit)
        assert got == trail[:len(got)] and len(got) >= limit
        assert len(got) == limit or got[-1].revision == trail[len(got) - 1].revision != trail[len(got)].revision
    assert len(store.changes_after(0, 1)) == (2 if store.store.url.startswith("etcd") else 1)


def test_where_a_consumer_of_the_trail_stands_is_kept_per_consumer_and_only_moves_forward(store):
    assert store.acknowledged("http://a:4318/v1/changes") == 0
    store.acknowledge("http://a:4318/v1/changes", 5)
    store.acknowledge("http://a:4318/v1/changes", 3)  # a replica behind the other: changes nothing
    store.acknowledge("http://b:4318/x/v1/changes?y=1", 2)
    assert store.acknowledged("http://a:4318/v1/changes") == 5
    assert store.acknowledged("http://b:4318/x/v1/changes?y=1") == 2
    assert store.history() == [] and store.list() == []  # no change, no resource


def test_where_a_consumer_stands_survives_a_restart(tmp_path):
    s = Sync(SqliteStore(tmp_path / "c.db"))
    s.acknowledge("http://a:4318/v1/changes", 9)
    s.close()
    s = Sync(SqliteStore(tmp_path / "c.db"))
    try:
        assert s.acknowledged("http://a:4318/v1/changes") == 9 and s.revision() == 0
    finally:
        s.close()


def test_revisions_survive_a_restart_and_keep_growing(tmp_path):
    s = Sync(SqliteStore(tmp_path / "c.db"))
    [(first, _)] = s.put([mode_resource("pay", "dry-run")], Change("ana"))
    s.close()
    s = Sync(SqliteStore(tmp_path / "c.db"))
    try:
        assert s.get("Mode", "pay").doc["spec"] == {"mode": "dry-run"} and s.revision() == first.revision
        [(res, _)] = s.put([mode_resource("pay", "enforce")], Change("ana"))
        assert res.revision > first.revision
    finally:
        s.close()


def test_a_sqlite_batch_is_stored_whole_or_not_at_all(tmp_path, monkeypatch):
    store = Sync(SqliteStore(tmp_path / "c.db"))
    docs = parse_documents(MESH + "---\n" + VS, "all.yaml")
    real = store.store._db

    class Failing:  # the second resource's write fails: the first must not stay
        def __init__(self):
            self.inserts = 0

        def execute(self, sql, *args):
            if sql.startswith("INSERT OR REPLACE"):
                self.inserts += 1
                if self.inserts == 2:
                    raise OSError("disk full")
            return real.execute(sql, *args)

    monkeypatch.setattr(store.store, "_db", Failing())
    with pytest.raises(OSError):
        store.put(docs, Change("ana"))
    monkeypatch.setattr(store.store, "_db", real)
    assert store.list() == [] and store.revision() == 0 and store.history() == []
    store.close()


def test_a_waiter_wakes_on_the_next_change_and_a_timeout_returns_the_revision(store):
    base = store.revision()

    async def main():
        waiting = asyncio.ensure_future(store.store.wait(base, 30))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        [(res, _)] = await store.store.put([mode_resource("pay", "dry-run")], Change("ana"))
        assert await waiting == res.revision
        assert await store.store.wait(base, 30) == res.revision  # already past: at once
        assert await store.store.wait(res.revision, 1) == res.revision  # nothing new: the current revision

    store.loop.run_until_complete(main())


def test_an_etcd_store_keeps_serving_with_one_member_killed(etcd, tmp_path):
    s = Sync(open_store(etcd.url))
    s.open()
    try:
        [(before, _)] = s.put([mode_resource("killed", "dry-run")], Change("ana"))
        etcd.kill(etcd.names[0])  # the member in use first
        [(after, _)] = s.put([mode_resource("killed", "enforce")], Change("ana", "during the outage"))
        assert after.revision > before.revision
        assert s.get("Mode", "killed").doc["spec"] == {"mode": "enforce"}
    finally:
        s.close()


def test_an_etcd_store_with_no_member_answering_is_unavailable_in_one_line():
    s = Sync(open_store("etcd://127.0.0.1:9,127.0.0.1:10"))
    with pytest.raises(StoreUnavailable, match="no etcd member answers at etcd://127.0.0.1:9,127.0.0.1:10"):
        s.open()
    s.close()


@pytest.mark.parametrize("url, message", [
    ("sqlite:", "needs a path"),
    ("etcd://127.0.0.1", "etcd store URL must be etcd://HOST:PORT"),
    ("etcd://a:1,b:x", "etcd store URL must be etcd://HOST:PORT"),
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

"""The `meshlens` command as a user types it: real subprocesses, real collector."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from meshlens.collector import batch_format
from tests.collector_process import CollectorProcess
from tests.e2e.test_collector_e2e import calls_batch, post, wait_for


def meshlens(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=120, input=stdin)


@pytest.mark.parametrize("sub", ["collector", "query", "schema", "analyze", "recommend", "proxy", "tap"])
def test_every_subcommand_has_help_with_examples(sub):
    proc = meshlens(sub, "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout


def test_no_subcommand_prints_help_and_exits_2():
    proc = meshlens()
    assert proc.returncode == 2 and "SUBCOMMAND" in proc.stdout


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    with CollectorProcess(tmp_path_factory.mktemp("cli")) as col:
        assert post(f"{col.base}/v1/calls", calls_batch(range(3)), batch_format.CONTENT_TYPE)[0] == 200
        from meshlens.collector.stores import connect

        store = connect(col.query_url)
        wait_for(lambda: int(store.query_rows("SELECT count() FROM meshlens.calls")[0][0]) == 3)
        yield col


def test_query_prints_an_aligned_table_with_unqualified_table_names(collector):
    proc = meshlens("query", "--store", collector.query_url,
                    "SELECT dst_service, count() AS n FROM calls GROUP BY dst_service")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["dst_service", "n"]
    assert lines[2].split() == ["checkout", "3"]
    assert lines[-1] == "(1 row)"


def test_query_csv_and_json(collector):
    proc = meshlens("query", "--store", collector.query_url, "--format", "csv",
                    "SELECT path, status FROM calls ORDER BY path")
    assert list(csv.reader(io.StringIO(proc.stdout))) == [
        ["path", "status"], ["/items/0", "200"], ["/items/1", "200"], ["/items/2", "200"]]
    proc = meshlens("query", "--store", collector.query_url, "--format", "json",
                    "SELECT path FROM calls ORDER BY path LIMIT 1")
    assert json.loads(proc.stdout) == {"path": "/items/0"}
    proc = meshlens("query", "--store", collector.query_url, "-", stdin="SELECT 1 AS one")
    assert proc.stdout.splitlines()[2].strip() == "1"


@pytest.mark.parametrize("args, message", [
    (["SELEC 1"], "Syntax error"),
    (["DROP TABLE calls"], "readonly"),
    ([""], "empty query"),
])
def test_query_errors_are_one_line_and_exit_2(collector, args, message):
    proc = meshlens("query", "--store", collector.query_url, *args)
    assert proc.returncode == 2
    assert message.lower() in proc.stderr.lower() and len(proc.stderr.strip().splitlines()) == 1


def test_query_on_an_unreachable_store_is_one_line_and_exit_2():
    proc = meshlens("query", "--store", "http://127.0.0.1:1/", "SELECT 1")
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_schema_prints_idempotent_ddl_for_a_cluster():
    proc = meshlens("schema", "--store", "clickhouse://ch1:9000/obs", "--cluster", "prod",
                    "--calls-retention-days", "90")
    assert proc.returncode == 0
    out = proc.stdout
    assert "CREATE DATABASE IF NOT EXISTS `obs` ON CLUSTER `prod`" in out
    assert "ReplicatedMergeTree" in out and "ENGINE = Distributed(`prod`, `obs`, `calls_local`" in out
    assert "TTL toDateTime(time) + toIntervalDay(90)" in out
    assert out.count("IF NOT EXISTS") == out.count("CREATE ")


def test_schema_bad_store_url_is_one_line_and_exit_2():
    proc = meshlens("schema", "--store", "bogus://x")
    assert proc.returncode == 2 and "unknown store scheme" in proc.stderr

"""`meshlens analyze` / `meshlens recommend` through their own parsers (main.py wiring is separate)."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from meshlens.collector.schema import Layout, migrate
from meshlens.collector.stores.embedded import EmbeddedStore
from meshlens.cli import analysis_cmd
from meshlens.cli.errors import UserError
from tests.analysis import traffic as gt


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshlens")
    analysis_cmd.add_parser(p.add_subparsers(dest="command"))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.run(args)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A generated store, closed again: each command opens it itself, as the CLI does."""
    path = tmp_path_factory.mktemp("cli") / "chdb"
    s = EmbeddedStore(path)
    gt.generate(s)
    s.close()
    return f"chdb:{path}"


@pytest.fixture(scope="module")
def empty_url(tmp_path_factory, url):
    path = tmp_path_factory.mktemp("empty") / "chdb"
    s = EmbeddedStore(path)
    migrate(s, Layout())
    s.close()
    return f"chdb:{path}"


SINCE, UNTIL = gt.WINDOW.since.isoformat(), gt.WINDOW.until.isoformat()


@pytest.mark.parametrize("sub", ["analyze", "recommend"])
def test_help_has_examples(sub, capsys):
    with pytest.raises(SystemExit):
        run(sub, "--help")
    assert "examples:" in capsys.readouterr().out


def test_recommend_table(url, capsys):
    assert run("recommend", "--store", url, "--since", SINCE, "--until", UNTIL) == 0
    out = capsys.readouterr().out
    assert "eject 10.0.2.3:8080" in out and "blocked by legacy-batch" in out
    assert "not enough data (n=50, need" in out
    assert "warning: retry amplification" in out


def test_recommend_yaml_and_json(url, capsys):
    assert run("recommend", "--store", url, "--service", "payments", "--format", "yaml") == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert {d["kind"] for d in docs} == {"VirtualService", "DestinationRule", "PeerAuthentication"}
    # the command asks for the recorded paths the YAML's uri matches are checked against
    uris = [m["uri"] for d in docs if d["kind"] == "VirtualService" for h in d["spec"]["http"] for m in h.get("match", [])]
    assert uris and all(set(u) <= {"exact", "regex"} for u in uris)
    assert run("recommend", "--store", url, "--service", "inventory", "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["target"]["callee"] for r in doc["recommendations"]} == {"inventory"}


def test_analyze_table_and_json(url, capsys):
    assert run("analyze", "--store", url, "--service", "catalog") == 0
    out = capsys.readouterr().out
    assert "service graph" in out and "/products/{id}" in out and "/stock/{id}" in out
    assert run("analyze", "--store", url, "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["edges"]) == 12


@pytest.mark.parametrize("argv, message", [
    (["--service", "nope"], "no calls to or from service 'nope'"),
    (["--since", "2020-01-01", "--until", "2020-01-02"], "no calls in the window"),
    (["--window", "1x"], "invalid duration"),
    (["--window", "1h", "--since", "2h"], "either --window or --since"),
])
def test_user_errors_are_one_line(url, argv, message):
    with pytest.raises(UserError, match=message) as e:
        run("recommend", "--store", url, *argv)
    assert "\n" not in str(e.value)


def test_an_empty_store_is_an_error(empty_url):
    with pytest.raises(UserError, match="holds no calls yet"):
        run("analyze", "--store", empty_url)


def test_an_unreachable_store_is_an_error():
    with pytest.raises(UserError, match="cannot reach the store"):
        run("recommend", "--store", "http://127.0.0.1:9/")


def test_recommend_through_the_collectors_read_only_query_endpoint(url, capsys, tmp_path):
    """The default deployment: the collector owns the embedded store, analysis reads over HTTP."""
    from tests.collector_process import CollectorProcess

    with CollectorProcess(tmp_path, url) as col:
        assert run("recommend", "--store", col.query_url, "--service", "inventory", "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    [outlier] = [r for r in doc["recommendations"] if r["kind"] == "outlier"]
    assert outlier["policy"]["eject"] == [gt.BAD_INSTANCE]


def test_analyze_on_an_empty_window_and_an_unknown_service(url):
    with pytest.raises(UserError, match="no calls in the window"):
        run("analyze", "--store", url, "--since", "2020-01-01", "--until", "2020-01-02")
    with pytest.raises(UserError, match="no calls to or from service 'nope' .*services seen: "):
        run("analyze", "--store", url, "--service", "nope")


def test_a_store_without_the_schema_is_an_error(tmp_path):
    with pytest.raises(UserError, match="has no calls table"):
        run("recommend", "--store", f"chdb:{tmp_path / 'fresh'}")


@pytest.mark.parametrize("case", ["empty store", "empty window", "unknown service", "unreachable store"])
def test_the_command_exits_non_zero_with_one_line(case, url, empty_url):
    """Through `meshlens` itself: the message on stderr, one line, no traceback, exit code 2."""
    import subprocess
    import sys

    argv = {"empty store": ["analyze", "--store", empty_url],
            "empty window": ["recommend", "--store", url, "--since", "2020-01-01", "--until", "2020-01-02"],
            "unknown service": ["recommend", "--store", url, "--service", "nope"],
            "unreachable store": ["analyze", "--store", "http://127.0.0.1:9/"]}[case]
    expected = {"empty store": "holds no calls yet", "empty window": "no calls in the window",
                "unknown service": "no calls to or from service 'nope'",
                "unreachable store": "cannot reach the store at http://127.0.0.1:9/"}[case]
    p = subprocess.run([sys.executable, "-m", "meshlens.cli.main", *argv], capture_output=True, text=True,
                       timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and p.stdout == ""
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in p.stderr


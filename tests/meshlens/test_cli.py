"""The `meshlens` command as a user types it: real subprocesses, real collector, real sockets."""
from __future__ import annotations

import contextlib
import csv
import http.server
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlens.collector import batch_format
from tests.collector_process import CollectorProcess
from tests.e2e.test_collector_e2e import calls_batch, post, wait_for


def meshlens(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    return subprocess.run([sys.executable, "-m", "meshlens.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=120, input=stdin)


@pytest.mark.parametrize("sub", ["collector", "query", "schema", "analyze", "recommend", "proxy", "proxy-iptables",
                                 "tap", "dashboards", "demo"])
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
    assert one_line(proc) == "meshlens query: cannot reach the store at http://127.0.0.1:1/: connection refused"


def test_schema_prints_idempotent_ddl_for_a_cluster():
    proc = meshlens("schema", "--store", "clickhouse://ch1:9000/obs", "--cluster", "prod",
                    "--calls-retention-days", "90")
    assert proc.returncode == 0
    out = proc.stdout
    assert "CREATE DATABASE IF NOT EXISTS `obs` ON CLUSTER `prod`" in out
    assert "ReplicatedMergeTree" in out and "ENGINE = Distributed(`prod`, `obs`, `calls_local`" in out
    assert "TTL toDateTime(time) + toIntervalDay(90)" in out
    assert out.count("IF NOT EXISTS") == out.count("CREATE ") + out.count("ADD COLUMN ")  # every statement idempotent


def test_schema_bad_store_url_is_one_line_and_exit_2():
    proc = meshlens("schema", "--store", "bogus://x")
    assert proc.returncode == 2 and "unknown store scheme" in proc.stderr


# -- every user-facing error: one line in words, exit 2 -------------------------------------------------


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command, checked for what must never be there."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "object at 0x" not in proc.stderr and "[Errno" not in proc.stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Files and ports the error cases name: {tmp}, {dead} (refuses), {busy} (taken), {web} (HTTP, not ClickHouse)."""
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "afile").write_text("not a directory")
    (tmp / "bin.yaml").write_bytes(b"\x00\xff\xfe not text")
    (tmp / "bad.yaml").write_text("services:\n  a: [\n")
    (tmp / "ok.yaml").write_text("services:\n  web: {}\n")
    (tmp / "dry.yaml").write_text("services:\n  catalog:\n    mode: dry-run\n")
    (tmp / "grpc.yaml").write_text("services:\n  web:\n    protocol: grpc2\n")
    (tmp / "retries.yaml").write_text("services:\n  web:\n    retries: 3\n")
    (tmp / "bad.pcap").write_bytes(b"not a capture file at all")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"tmp": str(tmp), "dead": str(_free_port()), "busy": str(busy.getsockname()[1]),
               "web": str(web.server_address[1])}
    finally:
        web.shutdown()
        web.server_close()
        thread.join(10)
        busy.close()


NO_PORTS = ["--outbound-port", "0", "--admin-port", "0", "--metrics-port", "0"]
COLLECTOR = ["collector", "--store", "chdb:{tmp}/store", "--spool-dir", "{tmp}/spool", "--otlp-http-port", "0",
             "--otlp-grpc-port", "0", "--query-port", "0"]

ERRORS = [
    (["query", "--store", "http://127.0.0.1:{dead}/", "SELECT 1"],
     "meshlens query: cannot reach the store at http://127.0.0.1:{dead}/: connection refused"),
    (["query", "--store", "clickhouse://127.0.0.1:{dead}/", "SELECT 1"],
     "meshlens query: cannot reach the store at clickhouse://127.0.0.1:{dead}/: connection refused"),
    (["query", "--store", "http://no-such-host.invalid:8123/", "SELECT 1"],
     "meshlens query: cannot reach the store at http://no-such-host.invalid:8123/: cannot resolve the host name"),
    (["query", "--store", "http://[::1", "SELECT 1"], "meshlens query: invalid store URL 'http://[::1': Invalid IPv6 URL"),
    (["query", "--store", "", "SELECT 1"], "meshlens query: empty store URL: use chdb:PATH"),
    (["query", "--store", "http://127.0.0.1:{web}/", "SELECT 1"],
     "meshlens query: the store at http://127.0.0.1:{web}/ answered HTTP 501, not as ClickHouse does"),
    (["query", "--store", "clickhouse://127.0.0.1:{web}/", "SELECT 1"],
     "meshlens query: the store at clickhouse://127.0.0.1:{web}/ does not speak ClickHouse's native protocol"),
    (["query", "--store", "chdb:{tmp}/fresh", "SELECT 1"],
     "meshlens query: the store at chdb:{tmp}/fresh has no database 'meshlens'"),
    (["query", "--store", "chdb:{tmp}/afile", "SELECT 1"], "meshlens query: cannot use data directory {tmp}/afile"),
    (["schema", "--store", "http://[::1"], "meshlens schema: invalid store URL 'http://[::1'"),
    (["schema", "--cluster", "bad name"], "meshlens schema: invalid identifier 'bad name'"),
    (["collector", "--config", "{tmp}/bin.yaml"], "meshlens collector: cannot read config file {tmp}/bin.yaml: "
                                                  "not UTF-8 text (byte 1)"),
    (["collector", "--config", "{tmp}/bad.yaml"], "meshlens collector: {tmp}/bad.yaml line 3: invalid YAML"),
    ([*COLLECTOR, "--otlp-http-port", "{busy}"],
     "meshlens collector: cannot listen on 127.0.0.1:{busy} (--otlp-http-port): address already in use"),
    ([*COLLECTOR, "--otlp-grpc-port", "{busy}"],
     "meshlens collector: cannot listen on 127.0.0.1:{busy} (--otlp-grpc-port): address already in use"),
    ([*COLLECTOR, "--query-port", "{busy}"],
     "meshlens collector: cannot listen on 127.0.0.1:{busy} (--query-port): address already in use"),
    ([*COLLECTOR, "--store", "http://127.0.0.1:{dead}/"],
     "meshlens collector: store http://127.0.0.1:{dead}/: cannot reach the store at http://127.0.0.1:{dead}/: "
     "connection refused"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/missing.yaml"],
     "meshlens proxy: cannot read mesh file {tmp}/missing.yaml: No such file or directory"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/bin.yaml"], "meshlens proxy: cannot read mesh file {tmp}/bin.yaml: "
                                                               "not UTF-8 text"),
    (["proxy", "--service", "catalog", "--mesh", "{tmp}/dry.yaml"],
     "meshlens proxy: {tmp}/dry.yaml: services.catalog.mode: dry-run is set through the control plane (meshlens "
     "mode set SERVICE dry-run), not in the mesh file"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/grpc.yaml"],
     "meshlens proxy: {tmp}/grpc.yaml: services.web.protocol: expected one of http, http2, grpc, tcp, tls, got "
     "'grpc2'"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/retries.yaml"],
     "meshlens proxy: {tmp}/retries.yaml: services.web: unknown field(s) retries"),
    (["proxy", "--service", "nope", "--mesh", "{tmp}/ok.yaml"], "meshlens proxy: no service 'nope' in the mesh (known: web)"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/ok.yaml", *NO_PORTS, "--outbound-port", "{busy}"],
     "meshlens proxy: cannot listen on 127.0.0.1:{busy} (--outbound-port): address already in use"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/ok.yaml", *NO_PORTS, "--collector", "http://[::1"],
     "meshlens proxy: invalid collector URL 'http://[::1': Invalid IPv6 URL"),
    (["proxy", "--service", "web", "--mesh", "{tmp}/ok.yaml", *NO_PORTS, "--idle-timeout", "-1"],
     "meshlens proxy: argument --idle-timeout: must be more than 0 seconds, got -1"),
    (["proxy-iptables"], "meshlens proxy-iptables: one of the arguments --print --apply --remove is required"),
    (["tap", "--pcap", "{tmp}/bad.pcap", "--out", "{tmp}/calls.csv"],
     "meshlens tap: {tmp}/bad.pcap: not a pcap or pcapng file"),
    (["tap", "--pcap", "{tmp}/missing.pcap"], "meshlens tap: cannot open capture file {tmp}/missing.pcap"),
    (["tap", "--pcap", "{tmp}/bad.pcap", "--mesh", "{tmp}/bad.yaml"], "meshlens tap: {tmp}/bad.yaml line 3: invalid YAML"),
    (["tap", "--iface", "nosuch0"], "meshlens tap: no such interface: nosuch0"),
    (["analyze", "--store", "http://127.0.0.1:{dead}/"],
     "meshlens analyze: cannot reach the store at http://127.0.0.1:{dead}/: connection refused"),
    (["recommend", "--store", "http://127.0.0.1:{web}/"],
     "meshlens recommend: the store at http://127.0.0.1:{web}/ answered HTTP 501, not as ClickHouse does"),
    (["recommend", "--window", "1x"], "meshlens recommend: invalid duration '1x'"),
    (["dashboards", "provision", "--grafana-url", "http://127.0.0.1:{dead}", "--token", "t"],
     "meshlens dashboards: cannot reach Grafana at http://127.0.0.1:{dead}"),
    (["dashboards", "provision", "--grafana-url", "http://127.0.0.1:{web}", "--token", "t"],
     "meshlens dashboards: Grafana at http://127.0.0.1:{web} answered 501 to the health check: "
     "a web page, not Grafana's API (is --grafana-url Grafana's own address, without /api?)"),
    (["dashboards", "provision", "--grafana-url", "http://[::1", "--token", "t"],
     "meshlens dashboards: invalid --grafana-url 'http://[::1': Invalid IPv6 URL"),
    (["dashboards", "provision", "--grafana-url", "http://127.0.0.1:{dead}", "--timeout", "-1"],
     "meshlens dashboards provision: argument --timeout: must be more than 0 seconds"),
    (["dashboards", "write-files", "{tmp}/d", "--clickhouse-url", "http://[::1"],
     "meshlens dashboards: invalid --clickhouse-url 'http://[::1'"),
    (["dashboards", "write-files", "{tmp}/afile"], "meshlens dashboards: cannot write provisioning files under {tmp}/afile"),
    (["demo", "--store", "http://x"], "meshlens demo: --store must be chdb:PATH"),
    (["demo", "--rate", "1000"], "meshlens demo: --rate is at most 100 requests/s, got 1000"),
]


@pytest.mark.parametrize("argv, expected", ERRORS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(ERRORS)])
def test_every_error_is_one_line_in_words_and_exit_2(places: dict[str, str], argv: list[str], expected: str) -> None:
    proc = meshlens(*(a.format(**places) for a in argv))
    assert one_line(proc).startswith(expected.format(**places))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop privileges")
def test_a_live_capture_without_privileges_says_what_it_needs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLENS_")}
    proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-m",
                           "meshlens.cli.main", "tap", "--iface", "lo", "--out", str(tmp_path / "c.csv")],
                          capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert one_line(proc) == "meshlens tap: no permission to capture on lo (needs root or CAP_NET_RAW)"


# -- arbitrary input: the CLI in this process (one example costs milliseconds, not a process start) ----------


def run_cli(*argv: str) -> tuple[int, str]:
    """meshlens.cli.main.main(argv): exit code and stderr; the logging it sets up is undone."""
    from meshlens.cli.main import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse
                code = int(e.code or 0)
    finally:
        root.handlers[:], root.level = handlers, level
    return code, err.getvalue()


def check_one_line(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, stderr)
    assert "Traceback" not in stderr and "object at 0x" not in stderr and "[Errno" not in stderr
    return lines[0]


mesh_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from(["http", "grpc", "tcp", "tls", "observe", "dry-run", "10.0.0.1:80", "[::1]:8080", "x:0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["services", "web", "instances", "address", "labels", "subsets", "protocol", "mode", "x"])
        | st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | mesh_like.map(lambda d: yaml.safe_dump(d).encode()))
def test_any_bytes_as_mesh_yaml_are_one_line_and_exit_2(tmp_path: Path, content: bytes) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_bytes(content)
    line = check_one_line(*run_cli("tap", "--pcap", str(tmp_path / "missing.pcap"), "--mesh", str(mesh)))
    assert line.startswith("meshlens tap: ")  # the mesh's problem, or (a valid mesh) the missing pcap


store_urls = st.tuples(st.sampled_from(["", "http://", "https://", "clickhouse://", "clickhouses://", "chdb:", "ftp://",
                                        "http://[", "http://u:p@"]),
                       st.text(max_size=30)).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=store_urls)
def test_any_string_as_a_store_url_is_a_schema_or_one_line_and_exit_2(url: str) -> None:
    code, stderr = run_cli("schema", f"--store={url}")
    if code != 0:
        assert check_one_line(code, stderr).startswith("meshlens schema: ")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=store_urls)
def test_any_string_as_a_clickhouse_url_is_files_or_one_line_and_exit_2(tmp_path: Path, url: str) -> None:
    code, stderr = run_cli("dashboards", "write-files", str(tmp_path / "prov"), f"--clickhouse-url={url}")
    if code != 0:
        assert check_one_line(code, stderr).startswith("meshlens dashboards: ")

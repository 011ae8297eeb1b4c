"""`meshlens dashboards provision|write-files` against a Grafana API in a thread, through real grafana-client."""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshlens.dashboards import load_all
from meshlens.cli.main import main
from tests.dashboards.grafana_server import FakeGrafana

UIDS = sorted(load_all())
COLLECTOR = "http://10.0.0.5:8123/?database=meshlens"


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana().start()
    yield g
    g.stop()


def provision(g: FakeGrafana, *extra: str, auth: tuple[str, ...] = ("--token", "good-token")) -> int:
    return main(["dashboards", "provision", "--grafana-url", g.url, *auth, "--clickhouse-url", COLLECTOR, *extra])


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_first_run_creates_everything(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(grafana) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["created datasource meshlens-clickhouse", "created folder meshlens"]
    assert sorted(out[2:]) == sorted(f"created dashboard {u}" for u in UIDS)
    st = grafana.state
    ds = st.datasources["meshlens-clickhouse"]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["name"] == "meshlens ClickHouse"
    assert {k: ds["jsonData"][k] for k in ("host", "port", "protocol", "secure", "defaultDatabase")} == {
        "host": "10.0.0.5", "port": 8123, "protocol": "http", "secure": False, "defaultDatabase": "meshlens"}
    assert ds["jsonData"]["traces"]["defaultTable"] == "otel_traces"
    assert list(st.folders) == ["meshlens"] and st.folders["meshlens"]["title"] == "meshlens"
    assert sorted(st.dashboards) == UIDS
    assert all(d["folderUid"] == "meshlens" and d["version"] == 1 for d in st.dashboards.values())
    # checks first, then writes: health, auth, plugin
    assert [r.path for r in st.requests[:3]] == [
        "/api/health", "/api/org", "/api/plugins/grafana-clickhouse-datasource/settings"]
    saved = [r.body for r in st.requests if r.path == "/api/dashboards/db"]
    assert all(b["overwrite"] is True for b in saved)
    marked = st.dashboards["meshlens-dryrun"]["dashboard"]["annotations"]["list"]
    assert [a["name"] for a in marked] == ["Annotations & Alerts", "Mode switches", "Policy changes",
                                           "Automatic rollbacks"]


def test_second_run_updates_in_place(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(grafana) == 0
    first = len(grafana.state.requests)
    assert provision(grafana) == 0
    out = capsys.readouterr().out.splitlines()
    assert "updated datasource meshlens-clickhouse" in out and "kept folder meshlens" in out
    st = grafana.state
    writes = [(r.method, r.path) for r in st.requests[first:] if r.method != "GET"]
    assert writes == ([("PUT", "/api/datasources/uid/meshlens-clickhouse")]
                      + [("POST", "/api/dashboards/db")] * len(UIDS))
    assert len(st.datasources) == 1 and len(st.folders) == 1 and sorted(st.dashboards) == UIDS
    assert all(d["version"] == 2 for d in st.dashboards.values())
    assert st.datasources["meshlens-clickhouse"]["version"] == 2


def test_basic_auth_and_a_native_server(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["dashboards", "provision", "--grafana-url", grafana.url, "--user", "admin", "--password", "secret",
               "--store", "clickhouse://reader:s3cret@ch1:9000/prod", "--prometheus-url", "http://prom:9090"])
    assert rc == 0, capsys.readouterr().err
    created = next(r.body for r in grafana.state.requests if r.path == "/api/datasources"
                   and r.body["type"] == "grafana-clickhouse-datasource")
    assert created["jsonData"]["protocol"] == "native" and created["jsonData"]["port"] == 9000
    assert created["jsonData"]["username"] == "reader" and created["secureJsonData"] == {"password": "s3cret"}
    assert grafana.state.datasources["meshlens-prometheus"]["url"] == "http://prom:9090"
    overview = grafana.state.dashboards["meshlens-overview"]["dashboard"]
    db = next(v for v in overview["templating"]["list"] if v["name"] == "database")
    assert db["query"] == "prod" and db["current"]["value"] == "prod"
    self_dash = grafana.state.dashboards["meshlens-self"]["dashboard"]
    prom = next(v for v in self_dash["templating"]["list"] if v["name"] == "prometheus")
    assert prom["current"]["value"] == "meshlens-prometheus"


def test_bad_credentials(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(grafana, auth=("--token", "wrong")) == 2
    line = one_line(capsys)
    assert line.startswith("meshlens dashboards: ") and "refused the credentials (401)" in line
    assert grafana.writes() == []
    assert provision(grafana, auth=("--user", "admin", "--password", "nope")) == 2
    assert "(401)" in one_line(capsys)


def test_a_token_without_rights(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(grafana, auth=("--token", "viewer-token")) == 2
    line = one_line(capsys)
    assert "(403)" in line and "creating datasource meshlens-clickhouse" in line


def test_missing_plugin(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    grafana.state.plugins.discard("grafana-clickhouse-datasource")
    assert provision(grafana) == 2
    line = one_line(capsys)
    assert "no ClickHouse plugin (grafana-clickhouse-datasource)" in line and "install" in line
    assert grafana.writes() == [], "nothing is created when the plugin is missing"


def test_unreachable_grafana(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["dashboards", "provision", "--grafana-url", f"http://127.0.0.1:{port}", "--token", "t",
               "--clickhouse-url", COLLECTOR])
    assert rc == 2
    assert one_line(capsys) == (f"meshlens dashboards: cannot reach Grafana at http://127.0.0.1:{port}: "
                                "Connection refused")


def test_a_datasource_name_taken_by_another_uid(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]) -> None:
    grafana.state.datasources["other"] = {"uid": "other", "name": "meshlens ClickHouse", "id": 99, "version": 1,
                                          "type": "grafana-clickhouse-datasource"}
    assert provision(grafana) == 2
    assert "already has a datasource named 'meshlens ClickHouse'" in one_line(capsys)
    assert provision(grafana, "--datasource-name", "meshlens CH") == 0


@pytest.mark.parametrize("url, words", [("chdb:/var/lib/meshlens", "collector's query endpoint"),
                                        ("ftp://x", "unknown store scheme")])
def test_unusable_clickhouse_url(grafana: FakeGrafana, capsys: pytest.CaptureFixture[str], url: str,
                                 words: str) -> None:
    rc = main(["dashboards", "provision", "--grafana-url", grafana.url, "--token", "good-token",
               "--clickhouse-url", url])
    assert rc == 2 and words in one_line(capsys)
    assert grafana.state.requests == []


def test_write_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["dashboards", "write-files", str(tmp_path), "--clickhouse-url", "https://ch.example:8443/?database=m",
               "--prometheus-url", "http://prom:9090"])
    assert rc == 0
    printed = {Path(p) for p in capsys.readouterr().out.split()}
    ds = yaml.safe_load((tmp_path / "datasources" / "meshlens.yaml").read_text())
    assert ds["apiVersion"] == 1
    ch, prom = ds["datasources"]
    assert (ch["uid"], ch["type"], prom["uid"], prom["type"]) == (
        "meshlens-clickhouse", "grafana-clickhouse-datasource", "meshlens-prometheus", "prometheus")
    assert ch["jsonData"]["secure"] is True and ch["jsonData"]["port"] == 8443 and ch["jsonData"]["protocol"] == "http"
    providers = yaml.safe_load((tmp_path / "dashboards" / "meshlens.yaml").read_text())["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file" and providers[0]["folderUid"] == "meshlens"
    json_dir = Path(providers[0]["options"]["path"])
    assert json_dir == (tmp_path / "dashboards" / "meshlens").resolve()
    files = sorted(json_dir.glob("*.json"))
    assert [f.stem for f in files] == UIDS and set(files) | {tmp_path / "datasources" / "meshlens.yaml",
                                                             tmp_path / "dashboards" / "meshlens.yaml"} == printed
    dash = json.loads((json_dir / "meshlens-readiness.json").read_text())
    assert next(v for v in dash["templating"]["list"] if v["name"] == "database")["query"] == "m"


def test_provision_write_files_and_json_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["dashboards", "provision", "--write-files", str(tmp_path), "--json-path", "/var/lib/grafana/meshlens"])
    assert rc == 0
    provider = yaml.safe_load((tmp_path / "dashboards" / "meshlens.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/meshlens"
    ds = yaml.safe_load((tmp_path / "datasources" / "meshlens.yaml").read_text())["datasources"][0]
    assert (ds["jsonData"]["host"], ds["jsonData"]["port"]) == ("127.0.0.1", 8123)


def test_write_files_to_an_unwritable_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["dashboards", "write-files", str(blocker / "sub")]) == 2
    assert "cannot write provisioning files" in one_line(capsys)


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dashboards", "provision", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--clickhouse-url" in out and "write-files" in out


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboards", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows] == UIDS and all("panels" in r for r in rows)

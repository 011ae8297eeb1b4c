"""The web console as a user meets it, in a real browser (Debian's chromium driven by Playwright), over real parts: a
collector (chdb) recording the calls of two sidecars that follow a control plane with a read and a write token, and
paced traffic through them. Then the console's JSON reads on their own (aiohttp's test client): every bad parameter
a 400 in one line, the calls store missing, away or slow said in one line, the pages served without a token.

Screenshots of each step go to $MESHLENS_TEST_ARTIFACTS/console (default /tmp/meshlens-test-artifacts/console).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meshlens.control.console.calls import CallsReader, CallsUnavailable
from meshlens.control.console.figures import jsonable
from meshlens.control.console.pages import CSP, STATIC
from meshlens.control.console.policies import naming
from meshlens.mesh import parse
from meshlens.policy.resources import parse_documents
from tests.collector_process import CollectorProcess
from tests.control.processes import ControlProcess
from tests.control.test_auth import cli
from tests.proxy.conftest import free_port
from tests.proxy.processes import ProxyProcess, SampleService
from tests.proxy.test_policies import config, follow, request
from tests.waiting import PATIENCE_S, wait_until

WRITE, READ = "w" * 32, "r" * 32
API_SIDECAR, WEB_SIDECAR = "a" * 32, "b" * 32
ARTIFACTS = Path(os.environ.get("MESHLENS_TEST_ARTIFACTS", "/tmp/meshlens-test-artifacts")) / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
FAILING_EVERY = 4  # one call through web's sidecar in four asks api for a 503
RETRIES = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api]
  http:
    - route: [{destination: {host: api}}]
      retries: {attempts: 2, retryOn: 5xx}
"""  # in observe nothing; in dry-run each 503 says would_retry


def ask(control: ControlProcess, path: str, token: str | None = READ) -> tuple[int, dict]:
    req = urllib.request.Request(control.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Traffic:
    """Paced calls: through web's sidecar to api (every FAILING_EVERY-th a 503), and straight to api's sidecar from
    no sidecar at all; `sent` counts each kind once answered."""

    def __init__(self, web: ProxyProcess, api: ProxyProcess) -> None:
        self.web, self.api = web, api
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()

    def send(self, n: int) -> None:
        for i in range(n):
            if i % 3 == 2:
                status = request(self.api.inbound, "api", "/hello")[0]
                kind = "direct"
            else:
                path = "/status/503" if self.sent["web"] % FAILING_EVERY == FAILING_EVERY - 1 else "/hello"
                status = request(self.web.outbound, "api", path)[0]
                kind = "web"
            assert status in (200, 503)
            with self._lock:
                self.sent[kind] += 1

    def paced(self, stop: threading.Event, every_s: float = 0.1, at_most: int = 1500) -> threading.Thread:
        """One call every `every_s` until `stop` (at most `at_most`)."""
        def run() -> None:
            for _ in range(at_most):
                if stop.wait(every_s):
                    return
                self.send(1)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def recorded(collector: CollectorProcess, where: str) -> int:
    from meshlens.collector.stores import connect

    store = connect(collector.query_url)
    try:
        return int(store.query_rows(f"SELECT count() FROM meshlens.calls WHERE {where}")[0][0])
    finally:
        store.close()


WEB_TO_API = "observer = 'client' AND src_service = 'web' AND dst_service = 'api'"
DIRECT_TO_API = "observer = 'server' AND src_service = '' AND dst_service = 'api'"


def settled(world: dict) -> None:
    """Every call sent so far is in the store, as both kinds of caller: the figures stop moving."""
    traffic, collector = world["traffic"], world["collector"]
    wait_until(lambda: recorded(collector, WEB_TO_API) == traffic.sent["web"] and
               recorded(collector, DIRECT_TO_API) == traffic.sent["direct"], "every call sent recorded")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("console")
    tokens = tmp / "tokens.yaml"
    tokens.write_text(f"""tokens:
  - {{name: ana, token: {WRITE}, role: write}}
  - {{name: viewer, token: {READ}, role: read}}
  - {{name: api-sidecar, token: {API_SIDECAR}, role: sidecar, service: api}}
  - {{name: web-sidecar, token: {WEB_SIDECAR}, role: sidecar, service: web}}
""")
    started: list = []
    app = SampleService().start()
    try:
        collector = CollectorProcess(tmp / "collector").start()
        started.append(collector)
        control = ControlProcess(tmp / "control", 0, None, "--tokens", str(tokens), "--calls-store",
                                 collector.query_url).start()
        started.append(control)
        inbound = free_port()
        mesh = tmp / "mesh.yaml"
        mesh.write_text(json.dumps({"services": {"web": {}, "api": {"instances": [f"127.0.0.1:{inbound}"]}}}))
        vs = tmp / "api-retries.yaml"
        vs.write_text(RETRIES)
        for f in (mesh, vs):
            out = cli(control, "apply", "-f", str(f), "--reason", "the mesh", token=WRITE)
            assert out.returncode == 0, out.stderr
        revision = ask(control, "/v1/modes")[1]["revision"]
        record = ("--collector", f"{collector.base}/v1/calls")
        api = ProxyProcess(tmp / "api", None, "api", *record, "--app-port", str(app.port), "--inbound-port",
                           str(inbound), "--control-token", API_SIDECAR, control=control.url).start()
        started.append(api)
        web = ProxyProcess(tmp / "web", None, "web", *record, "--control-token", WEB_SIDECAR,
                           control=control.url).start()
        started.append(web)
        for p in (api, web):
            follow(p, revision)
        traffic = Traffic(web, api)
        traffic.send(45)
        world = {"control": control, "collector": collector, "api": api, "web": web, "traffic": traffic}
        settled(world)
        yield world
    finally:
        for p in reversed(started):
            p.stop()
        app.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian's chromium is not installed (scripts/install-system.sh installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, world, request):
    """A fresh tab on the console; every request it makes is kept, to show that it asked nothing elsewhere."""
    from playwright.sync_api import expect

    expect.set_options(timeout=PATIENCE_S * 1000)
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(PATIENCE_S * 1000)
    tab.asked = []
    tab.on("request", lambda r: tab.asked.append(r.url))
    tab.allowed = [world["control"].url + "/"]
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.shots = ARTIFACTS / request.node.name
    tab.shots.mkdir(parents=True, exist_ok=True)
    yield tab
    context.close()
    assert not errors, f"the page's scripts failed: {errors}"
    elsewhere = [u for u in tab.asked if not u.startswith(("data:", *tab.allowed))]
    assert not elsewhere, f"the page asked beyond its control plane: {elsewhere}"


def shot(tab, name: str) -> None:
    tab.screenshot(path=str(tab.shots / f"{name}.png"), full_page=True)


def open_console(tab, world: dict, fragment: str, token: str | None) -> None:
    tab.goto(world["control"].url + "/console/" + fragment)
    if token:
        tab.fill("#token", token)
        tab.click("#token-form button[type=submit]")


# -- in the browser -------------------------------------------------------------------------------------------------


def test_the_map_shows_each_edges_figures_and_marks_the_caller_without_a_sidecar(world, page):
    from playwright.sync_api import expect

    settled(world)
    sent = world["traffic"].sent
    open_console(page, world, "#/map", READ)
    expect(page.locator("#who")).to_have_text("as viewer (read)")
    svg = page.locator("svg.map")
    for name in ("web", "api", "127.0.0.1"):
        expect(svg.locator(f'g.node[data-service="{name}"]')).to_be_visible()
    expect(svg.locator('g.node[data-service="127.0.0.1"]')).to_have_class(re.compile(r"\bnode-unmeshed\b"))
    expect(svg.locator('g.node[data-service="127.0.0.1"]')).to_contain_text("no sidecar")
    expect(svg.locator('g.node[data-service="web"]')).not_to_have_class(re.compile(r"\bnode-unmeshed\b"))
    failed = sent["web"] // FAILING_EVERY
    label = svg.locator('g.edge-label[data-edge="web->api"]')
    expect(label).to_have_text(re.compile(r"^[\d.]+/s · [\d.]+% err · p99 [\d.]+ ms$"))
    shown = float(re.search(r"([\d.]+)% err", label.text_content()).group(1))
    assert shown == pytest.approx(100 * failed / sent["web"], abs=0.051)
    # callers left of their callees
    x = {n: svg.locator(f'g.node[data-service="{n}"] rect').get_attribute("x") for n in ("web", "api", "127.0.0.1")}
    assert float(x["web"]) < float(x["api"]) and float(x["127.0.0.1"]) < float(x["api"])
    rows = page.locator("table.edges tbody tr")
    web_row = rows.filter(has_text=re.compile(r"^web\s*api"))
    expect(web_row).to_contain_text("client")
    expect(web_row.locator("td").nth(2)).to_have_text("http/1.1")
    expect(web_row.locator("td").nth(4)).to_have_text(f"{sent['web']:,}")
    direct = rows.filter(has_text="127.0.0.1")
    expect(direct).to_contain_text("no sidecar")
    expect(direct).to_contain_text("server")  # seen only by api's own sidecar
    expect(direct.locator("td").nth(4)).to_have_text(f"{sent['direct']:,}")
    shot(page, "1-map")
    # the same window again: read again. Playwright's sync API hands over events only inside its own calls,
    # so the re-read is waited for there, not by polling `page.asked` from here.
    with page.expect_request(lambda r: "/v1/console/map?" in r.url):
        page.click("form.window button")
    expect(label).to_be_visible()
    page.locator('svg.map a:has(g.node[data-service="api"])').click()
    expect(page.locator("h1")).to_contain_text("api")
    expect(page).to_have_url(re.compile(r"#/service/api$"))
    expect(page.locator("#traffic")).to_contain_text("Recommendations")
    expect(page.locator("#traffic")).to_contain_text("mTLS readiness")
    expect(page.locator("#traffic table.edges tbody tr").filter(has_text=re.compile(r"^web\s*api"))
           .locator("td").nth(2)).to_have_text("http/1.1")
    expect(page.locator("#traffic .verdict")).to_have_text(re.compile(r"^blocked by 127\.0\.0\.1"))
    shot(page, "2-service")


def test_a_read_token_is_denied_the_switch_and_a_write_token_makes_it_audited_and_applied(world, page):
    from playwright.sync_api import expect

    control, api = world["control"], world["api"]
    assert cli(control, "mode", "set", "api", "observe", "--reason", "start", token=WRITE).returncode == 0
    open_console(page, world, "#/service/api", None)
    expect(page.locator(".msg-error")).to_contain_text("this control plane needs a token")
    shot(page, "1-no-token")
    page.fill("#token", READ)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#mode-now")).to_have_text("observe")
    policy = page.locator("details.policy")
    expect(policy).to_contain_text("VirtualService default/api — routes calls to api")
    policy.locator("summary").click()
    expect(policy.locator("pre")).to_contain_text("retryOn: 5xx")

    def switch(reason: str) -> None:
        page.check('#mode-form input[value="dry-run"]')
        page.fill("#mode-reason", reason)
        page.click("#mode-form button[type=submit]")
        expect(page.locator("#mode-confirm")).to_contain_text("Switch api from observe to dry-run?")
        expect(page.locator("#mode-confirm")).to_contain_text(reason)
        page.click("#mode-apply")

    switch("see what the policies would do")
    expect(page.locator("#mode-answer .msg-error")).to_have_text(
        "refused (403): token 'viewer' (role read) may not change anything")
    expect(page.locator("#mode-now")).to_have_text("observe")
    shot(page, "2-denied")
    assert ask(control, "/v1/modes/api")[1]["modes"] == {"api": "observe"}

    page.fill("#token", WRITE)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#who")).to_have_text("as ana (write)")
    expect(page.locator("#mode-now")).to_have_text("observe")
    shot(page, "3-confirm-before")
    switch("canary: see what the policies would do")
    shot(page, "4-switched")
    answer = page.locator("#mode-answer .msg-ok")
    expect(answer).to_have_text(re.compile(r"^api is now in dry-run \(revision \d+, configured\)$"))
    revision = int(re.search(r"revision (\d+)", answer.inner_text()).group(1))
    expect(page.locator("#mode-now")).to_have_text("dry-run")
    newest = page.locator("table.history tbody tr").first
    expect(newest).to_contain_text(str(revision))
    expect(newest).to_contain_text("ana")
    expect(newest).to_contain_text("canary: see what the policies would do")
    expect(newest.locator("td").nth(3)).to_have_text("mode observe → dry-run")
    entries = ask(control, "/v1/history?service=api")[1]["entries"]
    last = entries[-1]
    assert (last["revision"], last["who"], last["reason"], last["after"]["spec"]["mode"]) == \
        (revision, "ana", "canary: see what the policies would do", "dry-run")
    c = follow(api, revision)  # the running sidecar applied it
    assert (c["mode"], c["control"]["desired_mode"]) == ("dry-run", "dry-run")
    assert config(world["web"])["destinations"]["api"]["mode"] == "dry-run"  # and the caller's sidecar
    sidecar = page.locator("table.sidecars tbody tr")
    expect(sidecar.locator("td").nth(2)).to_have_text(str(revision))  # the page shows what the sidecar applied
    expect(sidecar.locator("td").nth(3)).to_have_text("dry-run")
    shot(page, "5-applied")
    world["traffic"].send(12)  # calls in dry-run: the VirtualService would retry the 503s among them
    wait_until(lambda: recorded(world["collector"], f"{WEB_TO_API} AND mode = 'dry-run' AND "
                                                    "action LIKE '%would_retry%'"), "a would_retry call recorded")
    page.reload()
    dryrun = page.locator("section.card", has=page.locator("h2", has_text="Dry-run report"))
    expect(dryrun.locator("table.policies")).to_contain_text("would_retry")
    expect(dryrun.locator("table.modes")).to_contain_text("dry-run (as it went)")
    expect(dryrun.locator("ul.findings li").first).to_be_visible()  # the report's sentences, first
    dryrun.scroll_into_view_if_needed()
    shot(page, "6-dry-run-report")

    def guarded(window: str) -> None:
        page.check('#mode-form input[value="enforce"]')
        expect(page.locator("#mode-guard-line")).to_be_visible()
        page.check("#mode-guard")
        page.fill("#mode-guard-window", window)
        page.fill("#mode-reason", "enforce, guarded")
        page.click("#mode-form button[type=submit]")
        expect(page.locator("#mode-confirm")).to_contain_text(f"Guarded for {window}")
        page.click("#mode-apply")

    guarded("5 minutes")  # bad input: the API's one line on the page
    expect(page.locator("#mode-answer .msg-error")).to_have_text(re.compile(
        r"^refused \(400\): guard\.window: '5 minutes' is not a duration"))
    guarded("5m")  # a dozen calls in dry-run: too few to judge, nothing changed
    expect(page.locator("#mode-answer .msg-error")).to_have_text(re.compile(
        r"^refused \(409\): api: \d+ calls in dry-run in the last 5m, a guard needs 100 to judge"))
    expect(page.locator("#mode-now")).to_have_text("dry-run")
    shot(page, "7-guard-refused")
    assert ask(control, "/v1/modes/api")[1]["modes"] == {"api": "dry-run"}
    assert cli(control, "mode", "set", "api", "observe", "--reason", "back", token=WRITE).returncode == 0


def test_the_live_tail_shows_calls_as_they_come_and_filters_by_status(world, page):
    from playwright.sync_api import expect

    stop = threading.Event()
    pacer = world["traffic"].paced(stop)
    try:
        open_console(page, world, "#/tail", READ)
        rows = page.locator("table.tail tbody tr")
        expect(rows.filter(has_text="/hello").first).to_be_visible()
        newest = rows.first.get_attribute("data-t")
        wait_until(lambda: int(rows.first.get_attribute("data-t")) > int(newest), "newer calls on top of the tail")
        expect(rows.filter(has_text="503").first).to_be_visible()
        shot(page, "1-all")
        page.click("#tail-pause")
        expect(page.locator(".tail-state")).to_have_text(re.compile(r"^paused: \d+ calls shown$"))
        newest = rows.first.get_attribute("data-t")
        page.click("#tail-pause")  # resumed: asks at once, and newer calls come on top
        expect(page.locator("#tail-pause")).to_have_text("Pause")
        wait_until(lambda: int(rows.first.get_attribute("data-t")) > int(newest), "newer calls after resuming")
        page.select_option("select[name=status]", "5xx")
        expect(page).to_have_url(re.compile(r"#/tail\?status=5xx$"))
        expect(page.locator(".tail-state")).to_contain_text("status 5xx")  # the filtered view's own answer
        wait_until(lambda: rows.count() >= 2, "two 5xx calls in the tail")
        statuses = rows.locator("td.status").all_inner_texts()
        assert statuses and set(statuses) == {"503"}
        shot(page, "2-5xx")
        page.fill("input[name=service]", "web")
        page.select_option("select[name=status]", "2xx")
        expect(page).to_have_url(re.compile(r"#/tail\?service=web&status=2xx$"))
        expect(page.locator(".tail-state")).to_contain_text("to or from web, status 2xx")
        expect(rows.first).to_be_visible()
        callers = set(rows.locator("td:nth-child(3)").all_inner_texts())
        assert callers == {"web"} and set(rows.locator("td.status").all_inner_texts()) == {"200"}
        shot(page, "3-web-2xx")
    finally:
        stop.set()
        pacer.join(60)


def test_bad_input_on_the_page_is_answered_with_a_message_never_a_stack_trace(world, page):
    from playwright.sync_api import expect

    open_console(page, world, "#/map?window=abc", READ)
    expect(page.locator(".msg-error")).to_have_text("window must be a duration such as 90s, 15m, 1h or 7d, not 'abc'")
    shot(page, "1-bad-window")
    page.goto(world["control"].url + "/console/#/service/nope")
    expect(page.locator(".msg-error")).to_have_text("no service 'nope' in the mesh")
    page.goto(world["control"].url + "/console/#/service/Not%20a%20name")
    expect(page.locator(".msg-error")).to_contain_text("is not a service name")
    shot(page, "2-unknown-service")
    page.goto(world["control"].url + "/console/#/service/api?window=0s")
    expect(page.locator("#traffic .msg-error")).to_have_text("window must be 1s to 31d, not '0s'")
    expect(page.locator("#mode-now")).to_be_visible()  # the rest of the page is there
    page.check('#mode-form input[value="enforce"]')
    page.click("#mode-form button[type=submit]")
    expect(page.locator("#mode-answer .msg-error")).to_have_text("a reason is required: say why, for the history")
    expect(page.locator("#mode-confirm")).to_be_hidden()
    page.fill("#mode-reason", "   ")
    page.click("#mode-form button[type=submit]")
    expect(page.locator("#mode-answer .msg-error")).to_have_text("a reason is required: say why, for the history")
    shot(page, "3-empty-reason")
    page.goto(world["control"].url + "/console/#/tail?service=Bad!")
    expect(page.locator(".tail-state .msg-error")).to_contain_text("is not a service name")
    shot(page, "4-bad-filter")
    for text in (page.content(),):
        assert "Traceback" not in text and "Internal Server Error" not in text


def test_without_a_calls_store_the_console_says_so_in_one_line_and_the_rest_works(world, page, tmp_path):
    from playwright.sync_api import expect

    with ControlProcess(tmp_path / "control") as bare:
        page.allowed.append(bare.url + "/")
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text("services:\n  web: {}\n  api: {}\n")
        assert cli(bare, "apply", "-f", str(mesh), "--reason", "x").returncode == 0
        page.goto(bare.url + "/console/#/map")
        expect(page.locator("#who")).to_have_text("no tokens on this control plane (loopback only)")
        expect(page.locator(".msg-warn")).to_have_text(re.compile(r"^no calls store: "))
        expect(page.locator(".idle")).to_contain_text("api")
        page.click(".idle a:has-text('api')")
        expect(page.locator("#traffic .msg-error")).to_have_text(re.compile(r"^no calls store: "))
        page.check('#mode-form input[value="dry-run"]')
        page.fill("#mode-reason", "no tokens here")
        page.click("#mode-form button[type=submit]")
        page.click("#mode-apply")
        expect(page.locator("#mode-answer .msg-ok")).to_contain_text("api is now in dry-run")
        expect(page.locator("table.history")).to_contain_text("no tokens here")
        shot(page, "1-no-calls-store")


# -- the JSON reads on their own ------------------------------------------------------------------------------------

MESH_DOC = """apiVersion: meshlens.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  services:
    web: {}
    api: {namespace: shop, instances: [{address: '127.0.0.1:9', labels: {version: v1}}]}
"""
TOKENS_FOR_UNITS = {"ana": ("write", WRITE), "viewer": ("read", READ)}


def serve(calls_store: str | None = None, tokens: bool = True, docs: str = MESH_DOC):
    """Run `check(client)` against an in-process control plane app (SQLite in a temporary directory)."""
    import tempfile

    from aiohttp.test_utils import TestClient, TestServer

    from meshlens.control.api import build_app
    from meshlens.control.auth import Token, Tokens
    from meshlens.control.store import Change, SqliteStore

    def run(check) -> None:
        async def go() -> None:
            with tempfile.TemporaryDirectory() as d:
                store = SqliteStore(Path(d) / "c.db")
                await store.open()
                await store.put(parse_documents(docs, "test"), Change("test"))
                import hashlib

                held = Tokens({hashlib.sha256(secret.encode()).digest(): Token(name, role)
                               for name, (role, secret) in TOKENS_FOR_UNITS.items()}) if tokens else None
                async with TestClient(TestServer(build_app(store, held, None, calls_store))) as client:
                    await check(client)
                await store.close()
        in_thread(go)
    return run


def in_thread(main) -> None:
    """asyncio.run(main()) in a thread of its own: Playwright's sync API holds a running loop in this one."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # re-raised in the test's thread
            failed.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(PATIENCE_S)
    assert not t.is_alive(), "the in-process control plane did not finish"
    if failed:
        raise failed[0]


READER = {"Authorization": f"Bearer {READ}"}


def one_line_error(body: dict) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


def test_pages_and_assets_need_no_token_and_let_the_page_load_or_reach_nothing_else():
    async def check(client) -> None:
        for path in ("/console", "/console/"):
            r = await client.get(path)
            assert r.status == 200 and r.content_type == "text/html" and r.headers["Content-Security-Policy"] == CSP
        html = (await (await client.get("/console")).text())
        for asset in sorted(p.name for p in STATIC.iterdir() if p.name != "index.html"):
            r = await client.get(f"/console/static/{asset}")
            assert r.status == 200 and r.headers["Content-Security-Policy"] == CSP, asset
            text = await r.text()
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, asset
        assert "http" not in html.lower().replace("http-equiv", "")
        for path in ("/console/static/nope.js", "/console/static/index.html", "/console/static/%2e%2e%2fapi.py",
                     "/console/static/../v1/modes", "/console/../v1/modes"):
            r = await client.get(path)
            assert r.status in (401, 404) and "modes" not in await r.text(), path
        r = await client.get("/v1/console/map")
        assert r.status == 401 and one_line_error(await r.json()).startswith("this control plane needs a token")
        r = await client.get("/v1/console/whoami", headers=READER)
        assert await r.json() == {"tokens": True, "name": "viewer", "role": "read"}
    serve()(check)


BAD = [
    ("/v1/console/map?window=abc", "window must be a duration such as 90s, 15m, 1h or 7d, not 'abc'"),
    ("/v1/console/map?window=0s", "window must be 1s to 31d, not '0s'"),
    ("/v1/console/map?window=40d", "window must be 1s to 31d, not '40d'"),
    ("/v1/console/services/api/traffic?window=1x", "window must be a duration such as 90s, 15m, 1h or 7d, not '1x'"),
    ("/v1/console/services/Api", "'Api' is not a service name (lowercase letters, digits, '-' and '.')"),
    ("/v1/console/services/a%0Ab/traffic", "'a\\nb' is not a service name (lowercase letters, digits, '-' and '.')"),
    ("/v1/console/tail?after=-1", "after must be a time in nanoseconds since the epoch (the cursor an answer gave), "
                                  "not '-1'"),
    ("/v1/console/tail?after=99999999999999999999", "after must be a time in nanoseconds since the epoch (the cursor "
                                                    "an answer gave), not '99999999999999999999'"),
    ("/v1/console/tail?status=6xx", "status must be one of 2xx, 3xx, 4xx, 5xx, error (or empty for all), not '6xx'"),
    ("/v1/console/tail?limit=0", "limit must be a whole number from 1 to 500, not '0'"),
    ("/v1/console/tail?limit=%C2%B2", "limit must be a whole number from 1 to 500, not '²'"),
    ("/v1/console/tail?service=web;drop", "'web;drop' is not a service name (lowercase letters, digits, '-' and '.')"),
]


@pytest.mark.parametrize("path, said", BAD, ids=[p for p, _ in BAD])
def test_each_bad_parameter_is_a_400_in_one_line(path, said):
    async def check(client) -> None:
        r = await client.get(path, headers=READER)
        assert r.status == 400 and one_line_error(await r.json()) == said
    serve("http://127.0.0.1:9/")(check)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["window", "after", "status", "limit", "service"]), st.text(max_size=40),
                       max_size=5),
       st.sampled_from(["/v1/console/map", "/v1/console/tail", "/v1/console/services/api/traffic"]))
def test_fuzzed_parameters_are_answered_in_one_line_and_never_a_5xx_of_ours(query, path):
    async def check(client) -> None:
        r = await client.get(path, params=query, headers=READER)
        body = await r.json()
        assert r.status in (200, 400, 503), (r.status, body)  # 503: no calls store, said in one line
        if r.status != 200:
            one_line_error(body)
        assert (await client.get("/v1/console/services/api", headers=READER)).status == 200  # still serving
    serve(None)(check)


def test_without_a_calls_store_the_map_still_shows_the_mesh_and_the_reads_of_calls_say_why():
    async def check(client) -> None:
        body = await (await client.get("/v1/console/map", headers=READER)).json()
        assert body["calls"]["state"] == "unavailable" and body["calls"]["message"].startswith("no calls store: ")
        assert [(s["name"], s["in_mesh"], s["mode"]) for s in body["services"]] == \
            [("api", True, "observe"), ("web", True, "observe")] and body["edges"] == []
        for path in ("/v1/console/services/api/traffic", "/v1/console/tail"):
            r = await client.get(path, headers=READER)
            assert r.status == 503 and one_line_error(await r.json()).startswith("no calls store: ")
    serve(None)(check)


def test_a_calls_store_that_does_not_answer_is_said_in_one_line_and_the_console_keeps_serving():
    url = f"http://127.0.0.1:{free_port()}/"

    async def check(client) -> None:
        body = await (await client.get("/v1/console/map", headers=READER)).json()
        assert body["calls"]["state"] == "unavailable"
        assert body["calls"]["message"].startswith(f"cannot reach the store at {url}: ") and \
            "\n" not in body["calls"]["message"]
        r = await client.get("/v1/console/tail", headers=READER)
        assert r.status == 503 and one_line_error(await r.json()).startswith(f"cannot reach the store at {url}")
        assert (await client.get("/console/")).status == 200
        assert (await client.get("/v1/console/services/api", headers=READER)).status == 200
    serve(url)(check)


def test_a_service_the_mesh_does_not_define_is_a_404_and_one_it_does_names_its_policies():
    docs = MESH_DOC + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec: {hosts: [api], http: [{route: [{destination: {host: api}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
"""

    async def check(client) -> None:
        r = await client.get("/v1/console/services/nope", headers=READER)
        assert r.status == 404 and one_line_error(await r.json()) == "no service 'nope' in the mesh"
        body = await (await client.get("/v1/console/services/api", headers=READER)).json()
        assert body["namespace"] == "shop" and body["mode"] == "observe"
        assert body["instances"] == [{"address": "127.0.0.1:9", "labels": {"version": "v1"}}]
        assert [(p["kind"], p["name"], p["why"]) for p in body["policies"]] == \
            [("VirtualService", "shop/api", "routes calls to api")]
        assert "hosts:\n  - api" in body["policies"][0]["yaml"]
    serve(None, docs=docs)(check)


def test_a_read_past_its_deadline_is_a_504_and_keeps_its_slot_until_its_thread_ends():
    release = threading.Event()

    async def go() -> None:
        reader = CallsReader("http://127.0.0.1:9/", max_reads=1, timeout_s=0.2)
        with pytest.raises(CallsUnavailable, match=r"did not answer within 0\.2 s") as slow:
            await reader.read(lambda store: release.wait(60))
        assert slow.value.status == 504
        with pytest.raises(CallsUnavailable, match="still busy with earlier reads") as busy:
            await reader.read(lambda store: 1)  # the first read's thread still holds the only slot
        assert busy.value.status == 504
        release.set()
        reader.timeout_s = PATIENCE_S
        assert await reader.read(lambda store: 2) == 2  # its thread ended: the slot is free again
    in_thread(go)


def test_policies_name_a_service_as_sidecars_read_them():
    docs = parse_documents("""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: shop}
spec: {host: api.shop.svc.cluster.local}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other, namespace: default}
spec: {host: api}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: all, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v1-only, namespace: shop}
spec: {selector: {matchLabels: {version: v1}}, action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v2-only, namespace: shop}
spec: {selector: {matchLabels: {version: v2}}, action: DENY, rules: [{}]}
---
apiVersion: meshlens.io/v1alpha1
kind: LocalRateLimit
metadata: {name: api}
spec: {tokenBucket: {maxTokens: 5, fillInterval: 1s}}
""", "t")
    svc = parse({"services": {"api": {"namespace": "shop", "instances": [
        {"address": "127.0.0.1:9", "labels": {"version": "v1"}}]}}}).services["api"]
    assert [(p["kind"], p["name"], p["why"]) for p in naming(docs, svc)] == [
        ("DestinationRule", "default/other", "traffic policy for host api"),  # meshlens' services are flat
        ("DestinationRule", "shop/api", "traffic policy for host api.shop.svc.cluster.local; not in force: "
                                        "sidecars use default/other, the first by namespace/name"),
        ("PeerAuthentication", "istio-system/all", "mesh-wide (istio-system)"),
        ("AuthorizationPolicy", "shop/v1-only", "selects it (version=v1)"),
        ("LocalRateLimit", "api", "rate-limits its inbound calls"),
    ]


def test_figures_are_json_a_browser_reads():
    import numpy as np
    import pandas as pd

    got = jsonable({"a": np.int64(3), "b": float("nan"), "c": (np.float32(0.5), np.inf), 4: np.bool_(True),
                    "t": pd.Timestamp("2026-01-02T03:04:05Z"), "arr": np.array([1, 2])})
    assert got == {"a": 3, "b": None, "c": [0.5, None], "4": True, "t": "2026-01-02T03:04:05+00:00", "arr": [1, 2]}
    json.loads(json.dumps(got, allow_nan=False))


def test_the_map_and_a_services_figures_follow_generated_traffic_of_known_truth(tmp_path):
    """The reads the page shows, straight over analysis: tests/analysis/traffic.py's calls, whose truth is fixed."""
    from meshlens.collector.stores.embedded import EmbeddedStore
    from meshlens.control.console.figures import service_map, service_traffic
    from tests.analysis import traffic as gt

    store = EmbeddedStore(tmp_path / "chdb")
    try:
        gt.generate(store)
        drawn = service_map(store, gt.WINDOW)
        json.dumps(drawn, allow_nan=False)
        services = {s["name"]: s for s in drawn["services"]}
        assert {n for n, s in services.items() if s["caller"] and not s["meshed"]} == gt.UNMESHED
        assert services["frontend"]["meshed"] and (services["frontend"]["level"], services["catalog"]["level"],
                                                   services["inventory"]["level"]) == (0, 1, 2)
        [edge] = [e for e in drawn["edges"] if (e["caller"], e["callee"]) == ("frontend", "catalog")]
        assert (edge["n"], edge["protocol"], edge["observer"], edge["caller_meshed"]) == \
            (gt.CATALOG_N, "http/1.1", "client", True)
        assert all(not e["caller_meshed"] for e in drawn["edges"] if e["caller"] in gt.UNMESHED)

        catalog = service_traffic(store, gt.WINDOW, "catalog", [])
        json.dumps(catalog, allow_nan=False)
        recs = {r["kind"]: r for r in catalog["recommendations"] if r["policy"]}
        cut = recs["timeout"]["whatif"]
        assert (cut["n"], cut["cut"], cut["cut_ok"]) == (gt.CATALOG_N, 0, 0)  # no healthy call is that slow
        assert cut["says"] == f"0 of {gt.CATALOG_N} calls would have been cut at 140 ms, 0 of them calls that " \
                              f"succeeded"
        retried = recs["retry"]["whatif"]
        assert retried["recovered_lo"] <= retried["recovered"] <= retried["recovered_hi"] <= \
            retried["transient_failures"]
        assert catalog["readiness"]["verdict"] == "STRICT-ready"
        assert catalog["dryrun"].startswith("no calls to catalog in dry-run")

        inventory = service_traffic(store, gt.WINDOW, "inventory", [])
        [outlier] = [r for r in inventory["recommendations"] if r["kind"] == "outlier"]
        replay = outlier["whatif"]
        tripped = {i["instance"] for i in replay["instances"] if i["trips"]}
        assert tripped == {gt.BAD_INSTANCE} == set(outlier["policy"]["eject"])
        assert replay["rejected"] == sum(i["rejected"] for i in replay["instances"]) > 0
    finally:
        store.close()

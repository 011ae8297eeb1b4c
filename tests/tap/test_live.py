"""Live capture of real traffic: nginx in one network namespace, curl and wrk in another, the tap
on the client's veth; its calls are compared with nginx's access log, count for count and status
for status.

The load is bounded, never as fast as the machine goes: fixed counts of curl requests and a wrk
paced by its Lua `delay()` (as bench/tap_live.py does). At most a few thousand calls, whose
packets fit the capture socket's buffer (CAPTURE_BUFFER_BYTES) even if the tap read none of them
before it is stopped, so a slow or busy machine cannot make it drop one; whether the tap keeps up
with a given rate is bench/tap_live.py's question. The tap is stopped once every connection is
closed at both ends, when every packet has been captured and every request logged.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from meshlens.tap.capture import CAPTURE_BUFFER_BYTES
from tests.netns import Namespaces
from tests.waiting import PATIENCE_S, wait_until

SUFFIX = f"{os.getpid() % 100000}"  # as tests.netns.Namespaces names them
NS_SERVER, NS_CLIENT = f"mlsrv{SUFFIX}", f"mlcli{SUFFIX}"
VETH_SERVER, VETH_CLIENT = f"mls{SUFFIX}", f"mlc{SUFFIX}"
# A private /30 nobody routes: 10.213.7.1 (nginx) and 10.213.7.2 (clients, tap).
SERVER_IP, CLIENT_IP = "10.213.7.1", "10.213.7.2"
PORT = 8080
# wrk: WRK_CONNECTIONS connections, each waiting WRK_DELAY_MS after a response before its next request,
# for WRK_SECONDS: at most WRK_MAX_CALLS calls however fast the machine is (twice that to be safe: wrk
# notices the end of its -d on a 100 ms timer).
WRK_CONNECTIONS, WRK_DELAY_MS, WRK_SECONDS = 4, 10, 2
WRK_MAX_CALLS = WRK_CONNECTIONS * WRK_SECONDS * 1000 // WRK_DELAY_MS
# curl's sequential keep-alive requests: a count, one in flight at a time.
CURL_SEQUENCE = 1000
# What a call can hold in the capture socket's buffer: about 4 frames (request, response, ACKs), each
# charged at its buffer's true size, under 4 KiB for these small ones; twice on lo (both directions).
FRAMES_PER_CALL, FRAME_CHARGE = 4, 4096
assert max(2 * WRK_MAX_CALLS, 2 * (CURL_SEQUENCE + 6)) * FRAMES_PER_CALL * FRAME_CHARGE < CAPTURE_BUFFER_BYTES

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format tap '$status $request_method $request_uri';
    access_log {d}/access.log tap;
    client_body_temp_path {d}/tmp;
    server {{
        listen {ip}:{port};
        keepalive_requests 100000;
        location / {{ return 200 "ok\\n"; }}
        location /missing {{ return 404; }}
        location /teapot {{ return 418 "short and stout"; }}
    }}
}}
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=PATIENCE_S)


in_ns = Namespaces.argv


@pytest.fixture(scope="module")
def netns() -> Iterator[None]:
    for tool in ("nginx", "curl", "wrk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with Namespaces("ml") as ns:  # deletes both namespaces, and with them the veth pair, on the way out
        assert (ns.add("srv"), ns.add("cli")) == (NS_SERVER, NS_CLIENT)
        ns.veth(NS_SERVER, VETH_SERVER, NS_CLIENT, VETH_CLIENT)
        for name, dev, ip in ((NS_SERVER, VETH_SERVER, SERVER_IP), (NS_CLIENT, VETH_CLIENT, CLIENT_IP)):
            ns.run(name, "ip", "addr", "add", f"{ip}/30", "dev", dev)
            ns.run(name, "ip", "link", "set", dev, "up")
        yield


def wait_ready(proc: subprocess.Popen, port: int, what: str) -> None:
    """Until the server in the server namespace answers /ready from the client namespace."""
    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        return sh(*in_ns(NS_CLIENT, "curl", "-s", "-o", "/dev/null", f"http://{SERVER_IP}:{port}/ready"),
                  check=False).returncode == 0
    wait_until(answers, f"{what} answering", poll=0.1)


# Every TCP state but LISTEN and TIME-WAIT: a connection in one of them still has packets to come.
OPEN_STATES = ("established", "syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack",
               "closing")


def wait_all_closed(port: int) -> None:
    """Until no connection to `port` is open in either namespace: every packet of them has been
    through both ends (so past the tap's socket), and the server has logged every request (nginx and
    aiohttp log a request before they close its connection)."""
    states = [arg for state in OPEN_STATES for arg in ("state", state)]
    for ns in (NS_CLIENT, NS_SERVER):
        wait_until(lambda: not sh(*in_ns(ns, "ss", "-Htn", *states, f"( sport = :{port} or dport = :{port} )"))
                   .stdout.strip(), f"connections to port {port} closed in {ns}", poll=0.1)


@pytest.fixture
def nginx(netns: None, tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, ip=SERVER_IP, port=PORT))
    proc = subprocess.Popen(in_ns(NS_SERVER, "nginx", "-c", str(conf), "-p", str(d)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(proc, PORT, "nginx")
        yield d
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


AIOHTTP_SERVER = """
import logging, sys
from aiohttp import web

async def ok(request):
    await request.read()
    return web.Response(text="ok")

async def missing(request):
    return web.Response(status=404)

async def teapot(request):
    return web.Response(status=418, text="short and stout")

app = web.Application()
app.router.add_route("*", "/missing", missing)
app.router.add_route("*", "/teapot", teapot)
app.router.add_route("*", "/{tail:.*}", ok)
log = logging.getLogger("access")
log.setLevel(logging.INFO)
log.addHandler(logging.FileHandler(sys.argv[1]))
web.run_app(app, host=sys.argv[2], port=int(sys.argv[3]), access_log=log, access_log_format="%s %r", print=None)
"""


@pytest.fixture
def aiohttp_server(netns: None, tmp_path: Path) -> Iterator[Path]:
    script, log = tmp_path / "server.py", tmp_path / "aiohttp-access.log"
    script.write_text(AIOHTTP_SERVER)
    proc = subprocess.Popen(in_ns(NS_SERVER, sys.executable, str(script), str(log), SERVER_IP, str(PORT + 1)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(proc, PORT + 1, "aiohttp server")
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_live_capture_matches_nginx_access_log(nginx: Path, tmp_path: Path) -> None:
    capture_and_compare(nginx / "access.log", PORT, tmp_path, NS_CLIENT, VETH_CLIENT, CLIENT_IP)


def test_live_capture_matches_aiohttp_access_log(aiohttp_server: Path, tmp_path: Path) -> None:
    # curl only: aiohttp logs nothing for a request whose client (wrk, at its end) went away
    capture_and_compare(aiohttp_server, PORT + 1, tmp_path, NS_CLIENT, VETH_CLIENT, CLIENT_IP, wrk=False)


def test_loopback_sees_each_packet_twice_and_counts_it_once(nginx: Path, tmp_path: Path) -> None:
    # inside the server's namespace its own address is reached over lo
    # curl's sequential keep-alive requests, not wrk: each packet is captured twice on lo
    err = capture_and_compare(nginx / "access.log", PORT, tmp_path, NS_SERVER, "lo", SERVER_IP, wrk=False)
    fields = dict(f.split("=", 1) for f in err.strip().splitlines()[-1].split()[2:])
    assert int(fields["kernel_received"]) >= 2 * int(fields["calls"])


def served_calls(log: Path) -> collections.Counter:
    """(method, path, status) counts from a server log of `STATUS METHOD URI` lines."""
    served: collections.Counter = collections.Counter()
    for entry in log.read_text().splitlines():
        status, method, uri = entry.split(" ")[:3]
        if uri == "/ready":  # a readiness probe from before the capture, logged after the log was emptied
            continue
        # 499: the client (wrk, at its end) closed before the answer; the tap sees a request with no response
        served[(method, uri.split("?")[0], 0 if status == "499" else int(status))] += 1
    return served


def capture_and_compare(log: Path, port: int, tmp_path: Path, ns: str, iface: str, client_ip: str,
                        wrk: bool = True) -> str:
    """Tap `iface` in `ns` while curl and wrk (from `ns`) talk to the server; compare calls with its log
    (lines starting `STATUS METHOD URI`). wrk paced (WRK_MAX_CALLS at most), or CURL_SEQUENCE requests."""
    log.write_text("")  # the readiness probes happened before the tap started (the server appends)
    out = tmp_path / "calls.parquet"
    tap = subprocess.Popen(in_ns(ns, sys.executable, "-m", "meshlens.cli.main", "tap", "--no-progress",
                                 "--iface", iface, "--filter", f"tcp port {port}", "--out", str(out)),
                           stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert tap.stderr is not None
        lines = [tap.stderr.readline()]
        while lines[-1] and "capturing" not in lines[-1]:
            lines.append(tap.stderr.readline())
        assert "capturing" in lines[-1], "".join(lines)
        base = f"http://{SERVER_IP}:{port}"
        # keep-alive: several URLs on one connection; a 404, a 418, a POST with a body, a HEAD
        sh(*in_ns(ns, "curl", "-s", "-o", "/dev/null", f"{base}/a", f"{base}/missing", f"{base}/teapot",
                  f"{base}/b?q=1"))
        sh(*in_ns(ns, "curl", "-s", "-o", "/dev/null", "-X", "POST", "--data", "x" * 3000, f"{base}/post"))
        sh(*in_ns(ns, "curl", "-s", "-o", "/dev/null", "-I", f"{base}/head"))
        fixed = 6  # the curl requests above
        if wrk:
            pace = tmp_path / "pace.lua"
            pace.write_text(f"function delay() return {WRK_DELAY_MS} end\n")
            done = sh(*in_ns(ns, "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s", "-s", str(pace),
                             f"{base}/wrk"))
            assert "requests in" in done.stdout, done.stdout + done.stderr
        else:
            sh(*in_ns(ns, "curl", "-s", "-o", "/dev/null", f"{base}/glob/[1-{CURL_SEQUENCE}]"))
            fixed += CURL_SEQUENCE
        wait_all_closed(port)
    finally:
        tap.send_signal(signal.SIGTERM)  # the tap reads what its socket still holds, then exits
        _, err = tap.communicate(timeout=PATIENCE_S)
    assert tap.returncode == 0, err
    served = served_calls(log)
    calls = pq.read_table(out).to_pylist()
    # wrk opens a connection to check the server before its run: a tcp call without bytes, no request
    assert [(c["request_bytes"], c["response_bytes"]) for c in calls if c["protocol"] == "tcp"] in ([], [(0, 0)])
    calls = [c for c in calls if c["protocol"] == "http/1.1"]
    seen = collections.Counter((c["method"], c["path"], c["status"]) for c in calls)
    assert sum(served.values()) > fixed if wrk else sum(served.values()) == fixed  # the load really ran
    assert sum(served.values()) <= fixed + 2 * WRK_MAX_CALLS  # and was paced
    assert seen == served, err
    assert all(c["dst_addr"] == SERVER_IP and c["dst_port"] == port and c["src_addr"] == client_ip for c in calls)
    assert {c["error"] for c in calls if c["status"]} == {""}
    assert "kernel_dropped=0" in err
    return err


def test_a_pcap_of_real_traffic_gives_the_calls_in_the_access_log(nginx: Path, tmp_path: Path) -> None:
    """tcpdump records real curl and wrk traffic to nginx; `meshlens tap --pcap` reads the file afterwards."""
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed: run scripts/install-system.sh")
    log, pcap, out = nginx / "access.log", tmp_path / "real.pcap", tmp_path / "calls.parquet"
    log.write_text("")
    # immediate mode and a 64 MiB buffer: tcpdump must not drop what the tap is then asked to read
    dump = subprocess.Popen(in_ns(NS_CLIENT, "tcpdump", "-i", VETH_CLIENT, "-w", str(pcap), "-U", "--immediate-mode",
                                  "-B", "65536", f"tcp port {PORT}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        assert "listening" in dump.stderr.readline()
        base = f"http://{SERVER_IP}:{PORT}"
        sh(*in_ns(NS_CLIENT, "curl", "-s", "-o", "/dev/null", f"{base}/a", f"{base}/missing", f"{base}/teapot"))
        sh(*in_ns(NS_CLIENT, "curl", "-s", "-o", "/dev/null", "-X", "POST", "--data", "y" * 5000, f"{base}/post"))
        # a count of curl's keep-alive requests: it fits tcpdump's buffer however slowly tcpdump writes
        sh(*in_ns(NS_CLIENT, "curl", "-s", "-o", "/dev/null", f"{base}/seq/[1-500]"))
        wait_all_closed(PORT)
        # tcpdump stops at SIGINT with what it has written: first the answer to a last request must be in the
        # file, and with it every packet captured before
        sh(*in_ns(NS_CLIENT, "curl", "-s", "-o", "/dev/null", f"{base}/teapot?last"))

        def written() -> bool:
            data = pcap.read_bytes()
            last = data.find(b"GET /teapot?last ")
            return last >= 0 and data.find(b"short and stout", last) >= 0
        wait_until(written, "tcpdump writing the last answer")
        wait_all_closed(PORT)
    finally:
        dump.send_signal(signal.SIGINT)
        _, dump_err = dump.communicate(timeout=PATIENCE_S)
    assert "0 packets dropped by kernel" in dump_err, dump_err
    r = subprocess.run([sys.executable, "-m", "meshlens.cli.main", "tap", "--no-progress", "--pcap", str(pcap),
                        "--out", str(out)], capture_output=True, text=True, timeout=PATIENCE_S,
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    served = served_calls(log)
    calls = [c for c in pq.read_table(out).to_pylist() if c["protocol"] == "http/1.1"]
    assert sum(served.values()) == 505
    assert collections.Counter((c["method"], c["path"], c["status"]) for c in calls) == served

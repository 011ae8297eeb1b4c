"""Transparent mode: the iptables rules as data, SO_ORIGINAL_DST, and real redirects in network namespaces
(an app that knows nothing of the proxy calls another namespace's address; iptables sends the call through
both sidecars)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshlens.proxy.transparent import IptablesPlan, original_dst, removal, rules
from tests.netns import Namespaces
from tests.proxy.meshnet import APP_PORT, HUB_IP, INBOUND, OUTBOUND, MeshNet, client_and_server
from tests.waiting import PATIENCE_S

CMD = [sys.executable, "-m", "meshlens.cli.main", "proxy-iptables"]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
COLUMNS = "observer, trace_id, src_service, src_addr, dst_service, dst_addr, dst_port, path, status, error"


def test_the_rules_for_given_flags() -> None:
    plan = IptablesPlan(outbound_port=15001, inbound_port=15006, app_ports=(8080, 9090), exclude_ports=(22, 4318))
    assert [" ".join(argv) for argv in rules(plan)] == [
        "iptables -t nat -N MESHLENS_OUTPUT",
        "iptables -t nat -F MESHLENS_OUTPUT",
        "iptables -t nat -A MESHLENS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "iptables -t nat -A MESHLENS_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "iptables -t nat -A MESHLENS_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "iptables -t nat -A MESHLENS_OUTPUT -p tcp --dport 22 -j RETURN",
        "iptables -t nat -A MESHLENS_OUTPUT -p tcp --dport 4318 -j RETURN",
        "iptables -t nat -A MESHLENS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -t nat -N MESHLENS_INBOUND",
        "iptables -t nat -F MESHLENS_INBOUND",
        "iptables -t nat -A MESHLENS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "iptables -t nat -A MESHLENS_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006",
        "iptables -t nat -A OUTPUT -p tcp -j MESHLENS_OUTPUT",
        "iptables -t nat -A PREROUTING -p tcp -j MESHLENS_INBOUND",
    ]
    inbound_only = IptablesPlan(app_ports=(8080,), proxy_uid=None, outbound=False)
    assert [" ".join(argv) for argv in rules(inbound_only)] == [
        "iptables -t nat -N MESHLENS_INBOUND",
        "iptables -t nat -F MESHLENS_INBOUND",
        "iptables -t nat -A MESHLENS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        "iptables -t nat -A PREROUTING -p tcp -j MESHLENS_INBOUND",
    ]
    assert [" ".join(argv) for argv in removal()] == [
        "iptables -t nat -D OUTPUT -p tcp -j MESHLENS_OUTPUT",
        "iptables -t nat -D PREROUTING -p tcp -j MESHLENS_INBOUND",
        "iptables -t nat -F MESHLENS_OUTPUT",
        "iptables -t nat -X MESHLENS_OUTPUT",
        "iptables -t nat -F MESHLENS_INBOUND",
        "iptables -t nat -X MESHLENS_INBOUND",
    ]


def test_the_cli_prints_the_same_rules_and_refuses_a_plan_that_loops() -> None:
    out = subprocess.run([*CMD, "--print", "--app-port", "8080", "--proxy-uid", "2000", "--exclude-port", "22"],
                         capture_output=True, text=True, timeout=PATIENCE_S)
    plan = IptablesPlan(app_ports=(8080,), proxy_uid=2000, exclude_ports=(22,))
    assert out.returncode == 0 and out.stdout.splitlines() == [" ".join(a) for a in rules(plan)]
    bad = subprocess.run([*CMD, "--print", "--proxy-uid", "none", "--proxy-gid", "none"],
                         capture_output=True, text=True, timeout=PATIENCE_S)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "exempt one" in bad.stderr
    usage = subprocess.run([*CMD, "--app-port", "8080"], capture_output=True, text=True, timeout=PATIENCE_S)
    assert usage.returncode == 2 and "one of the arguments --print --apply --remove is required" in usage.stderr
    helptext = subprocess.run([*CMD, "--help"], capture_output=True, text=True, timeout=PATIENCE_S).stdout
    assert "examples:" in helptext and "--exclude-port" in helptext


def test_a_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as client:
            conn, _ = srv.accept()
            with conn:
                assert original_dst(conn) is None
                assert client.fileno() >= 0


def test_apply_is_idempotent_leaves_other_rules_alone_and_remove_undoes_it() -> None:
    with Namespaces("mlipt") as ns:
        if subprocess.run(["which", "iptables"], capture_output=True).returncode:
            pytest.skip("iptables is not installed")
        node = ns.add("n")
        foreign = ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN"]
        r = ns.run(node, *foreign, check=False)
        if r.returncode:
            pytest.skip(f"iptables does not work in a namespace here: {r.stderr.strip()}")

        def saved() -> list[str]:
            text = ns.run(node, "iptables-save", "-t", "nat").stdout
            return [line for line in text.splitlines() if line.startswith(("-A", ":MESHLENS"))]

        apply = [*CMD, "--apply", "--app-port", "8080", "--exclude-port", "22"]
        first = ns.run(node, *apply)
        once = saved()
        again = ns.run(node, *apply)
        assert saved() == once  # the chains were flushed and refilled; the jumps were not added twice
        assert "-A OUTPUT -p tcp -j MESHLENS_OUTPUT" not in again.stdout and first.stdout != again.stdout
        assert "-A OUTPUT -p udp -m udp --dport 53 -j RETURN" in once
        assert "-A MESHLENS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in once
        ns.run(node, *CMD, "--remove")
        assert saved() == ["-A OUTPUT -p udp -m udp --dport 53 -j RETURN"]
        ns.run(node, *CMD, "--remove")  # nothing left to remove is fine


def test_apply_without_cap_net_admin_is_one_line() -> None:
    with Namespaces("mlnocap") as ns:
        node = ns.add("n")  # even if the capability were not dropped, only this namespace would change
        r = ns.run(node, "setpriv", "--bounding-set", "-net_admin", "--", *CMD, "--apply", check=False)
        if r.returncode == 0:
            pytest.skip("iptables works without CAP_NET_ADMIN here")
        assert r.returncode == 2 and "needs root or CAP_NET_ADMIN" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_apply_without_iptables_is_one_line() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}  # no iptables to find: nothing can change
    r = subprocess.run([*CMD, "--apply"], capture_output=True, text=True, timeout=PATIENCE_S, env=env)
    assert r.returncode == 2 and r.stderr.strip() == \
        "meshlens proxy-iptables: iptables is not installed (Debian: apt-get install iptables)"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshNet]:
    with client_and_server(tmp_path_factory.mktemp("transparent"), "mltp") as net:
        yield net


def test_calls_are_redirected_through_both_sidecars_and_recorded(net: MeshNet) -> None:
    client, server = net.nodes["client"], net.nodes["server"]
    url = f"http://{server.ip}:{APP_PORT}/call"
    # the app calls the server's address with no proxy settings; iptables sends it through the sidecars
    r = net.curl(client.ns, "-H", f"traceparent: 00-{TRACE}-00f067aa0ba902b7-01", url)
    seen = json.loads(r.stdout)
    assert seen["service"] == "server" and seen["traceparent"].split("-")[1] == TRACE
    assert seen["peer_field"] is None  # sidecar to sidecar only: the app never sees it
    assert net.curl(client.ns, f"{url}?second").returncode == 0
    # uid 1337 is the proxy's: not redirected on the way out (no client record), still on the way in
    assert json.loads(net.curl(client.ns, f"http://{server.ip}:{APP_PORT}/call?as-proxy", uid=1337).stdout)
    # the unmeshed hub calls the server: recorded by the server's sidecar only, with no source service
    assert json.loads(net.curl(net.hub, f"http://{server.ip}:{APP_PORT}/call?from-hub").stdout)
    # a port nothing redirects: the client's sidecar still forwards it (to the original destination)
    refused = net.curl(client.ns, "-o", "/dev/null", "-w", "%{http_code}", f"http://{server.ip}:{APP_PORT + 1}/x")
    assert refused.stdout == "503"
    net.stop_sidecars()

    calls = net.calls(7, COLUMNS)
    client_side = [c for c in calls if c["observer"] == "client"]
    server_side = [c for c in calls if c["observer"] == "server"]
    # one client record per call: the sidecar's own upstream connections were not redirected back into it
    assert len(client_side) == 3 and len(server_side) == 4, calls
    traced = [c for c in calls if c["trace_id"] == TRACE]
    assert {c["observer"] for c in traced} == {"client", "server"} and len(traced) == 2
    for c in client_side[:2]:
        assert (c["src_service"], c["dst_service"], c["dst_addr"], c["dst_port"], c["status"]) == \
            ("client", "server", server.ip, APP_PORT, 200)
        assert c["src_addr"] == client.ip  # the app's own address: REDIRECT keeps the source
    unmeshed = client_side[2]
    assert (unmeshed["dst_service"], unmeshed["status"], unmeshed["error"]) == \
        (f"{server.ip}:{APP_PORT + 1}", 503, "refused")
    assert all(c["dst_service"] == "server" and c["status"] == 200 for c in server_side)
    assert [c["src_service"] for c in server_side] == ["client", "client", "client", ""]
    assert [c["src_addr"] for c in server_side] == [client.ip, client.ip, client.ip, HUB_IP]
    assert all((c["dst_addr"], c["dst_port"]) == ("127.0.0.1", APP_PORT) for c in server_side)  # the local app


def test_a_redirected_proxy_answers_508_instead_of_looping(net: MeshNet) -> None:
    """Rules that forget to exempt the proxy send its upstream connection back into it: 508, not a storm."""
    client, server = net.nodes["client"], net.nodes["server"]
    for node in (client, server):  # the previous test stopped the sidecars
        assert node.sidecar is not None
        if not node.sidecar.alive():
            node.sidecar.start()
    try:
        bad = net.iptables(client, "--apply", "--app-port", str(APP_PORT), "--proxy-uid", "4242", "--proxy-gid", "none")
        assert bad.returncode == 0, bad.stderr
        r = net.curl(client.ns, "-o", "/dev/null", "-w", "%{http_code}", f"http://{server.ip}:{APP_PORT}/call")
        assert r.stdout == "508"
    finally:
        good = net.iptables(client, "--apply", "--app-port", str(APP_PORT))
    assert good.returncode == 0, good.stderr
    # the pool still holds the looped upstream connection (conntrack keeps its NAT): start afresh
    assert client.sidecar.stop() == 0
    client.sidecar.start()
    r = net.curl(client.ns, f"http://{server.ip}:{APP_PORT}/call")
    assert json.loads(r.stdout)["service"] == "server"
    listing = net.namespaces.run(client.ns, "iptables", "-t", "nat", "-S", "MESHLENS_OUTPUT").stdout
    assert "--gid-owner 1337" in listing and f"--to-ports {OUTBOUND}" in listing
    assert f"--to-ports {INBOUND}" in net.namespaces.run(client.ns, "iptables", "-t", "nat", "-S").stdout

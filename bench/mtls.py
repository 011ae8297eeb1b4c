"""mTLS between two sidecars against two nginx hops doing the same, in the same run; and handshakes per second.

Run: .venv/bin/python bench/mtls.py [--duration 5] [--connections 32] [--rounds 2]
e.g. .venv/bin/python bench/mtls.py --duration 5 --rounds 2

Upstream: nginx (1 worker) `return 200`. Every path is two hops in front of it, each hop one process (one
sidecar against one nginx worker: the per-core comparison of bench/proxy.py):

- nginx mTLS: hop 1 `proxy_pass https://` with its client certificate, the server's chain and name verified
  (`proxy_ssl_verify on`), upstream keepalive; hop 2 `listen ... ssl` with `ssl_verify_client on`, proxying to the
  upstream. Their certificates (ECDSA P-256, as the mesh's) come from a root made here with `cryptography`, with a
  DNS name beside the SPIFFE id (nginx verifies a name; the sidecars verify the SPIFFE id instead).
- meshlens mTLS: a `web` sidecar (wrk on its outbound listener, Host: api) to an `api` sidecar (inbound, in front
  of the upstream), identities from a real `meshlens control` CA, the instance labelled
  security.istio.io/tlsMode: istio.
- For context: the same two hops in plaintext (nginx; meshlens through a `plain` service's sidecar, unlabelled).

Handshakes per second: a new upstream connection for every request between the hops (meshlens: a DestinationRule
with connectionPool.http.maxRequestsPerConnection: 1 for api, applied in enforce mode; nginx: hop 1 without
upstream keepalive), each with and without TLS session resumption (nginx `proxy_ssl_session_reuse on|off`;
meshlens: a second `web` sidecar started with proxy/mtls.py's MAX_SESSIONS = 0, which keeps no session). Each
such request is one handshake. The resumed share of the sidecar's handshakes is read from its /stats.

Prints each run, then the medians: req/s, p50/p99, the ratio to nginx mTLS (the issue's goal: throughput >= 0.8x
nginx's; added p99 over direct <= 2x nginx's added p99), and the CPU each process spent per request (user+system µs,
from /proc: each nginx worker, each sidecar). Reported, not asserted. Everything started is stopped at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.policies import apply  # noqa: E402
from bench.proxy import NGINX, cpu_s, free_port, nginx, worker, wrk  # noqa: E402
from tests.control.processes import ControlProcess  # noqa: E402
from tests.proxy.processes import ProxyProcess  # noqa: E402
from tests.proxy.test_policies import mode_doc  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

NO_RESUMPTION = "--bench-no-resumption"
ONE_PER_CONNECTION = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api-one-per-connection}
spec:
  host: api
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 1}
"""


# -- certificates for nginx ----------------------------------------------------------------------


def certificates(directory: Path) -> None:
    """ca.pem, and hop1/hop2 .pem/.key: ECDSA P-256 leaves for both TLS uses, named hop2.mesh and a SPIFFE id."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench mesh root")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, account in (("hop1", "web"), ("hop2", "api")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName(f"{name}.mesh"),
                    x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/default/sa/{account}")]), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


# -- nginx -------------------------------------------------------------------------------------


PASS = 'proxy_http_version 1.1; proxy_set_header Connection "";'


def hop2(workdir: Path, certs: Path, upstream: int, tls: bool) -> tuple[subprocess.Popen, int]:
    """The server-side hop: mTLS terminated (a client certificate from the root required), or plaintext."""
    ssl = (f"ssl_certificate {certs}/hop2.pem; ssl_certificate_key {certs}/hop2.key; "
           f"ssl_client_certificate {certs}/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3; "
           "ssl_session_tickets on; ") if tls else ""
    return nginx(workdir, f"{ssl}location / {{ proxy_pass http://app; {PASS} }}",
                 f"upstream app {{ server 127.0.0.1:{upstream}; keepalive 32; }}", "ssl" if tls else "", 4096)


def hop1(workdir: Path, certs: Path, to: int, tls: bool, keepalive: bool = True,
         reuse: bool = True) -> tuple[subprocess.Popen, int]:
    """The client-side hop: mTLS originated (its certificate; the server's chain and name verified), or plaintext;
    `keepalive` False opens a connection to hop 2 for every request."""
    ssl = (f"proxy_ssl_certificate {certs}/hop1.pem; proxy_ssl_certificate_key {certs}/hop1.key; "
           f"proxy_ssl_trusted_certificate {certs}/ca.pem; proxy_ssl_verify on; proxy_ssl_name hop2.mesh; "
           f"proxy_ssl_session_reuse {'on' if reuse else 'off'}; ") if tls else ""
    scheme = "https" if tls else "http"
    return nginx(workdir, f"location / {{ proxy_pass {scheme}://hop2; {PASS} {ssl}}}",
                 f"upstream hop2 {{ server 127.0.0.1:{to}; {'keepalive 32;' if keepalive else ''} }}",
                 worker_connections=4096)


# -- meshlens ----------------------------------------------------------------------------------


class Sidecar(ProxyProcess):
    """`meshlens proxy`; with `resume` False, started through this file with proxy/mtls.py's MAX_SESSIONS = 0."""

    def __init__(self, *args: object, resume: bool = True, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.resume = resume

    def launch(self, args, ready, timeout):  # type: ignore[no-untyped-def]
        if not self.resume:
            args = ["bench.mtls", NO_RESUMPTION, *args[1:]]
        return super().launch(args, ready, timeout)


def admin(p: ProxyProcess, page: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.ports['admin']}/{page}", timeout=30) as resp:
        return json.loads(resp.read())


def follow(p: ProxyProcess, revision: int, api_mode: str) -> None:
    def applied() -> bool:
        c = admin(p, "config")
        mode = c["destinations"].get("api", {}).get("mode", "observe")
        return (c["control"]["version"] == str(revision) and c["control"]["state"] == "ACK" and mode == api_mode
                and bool(c["identity"]) and c["identity"]["state"] == "valid")

    wait_until(applied, f"the sidecar on revision {revision} with its certificate, api in {api_mode}")


# -- measuring -----------------------------------------------------------------------------------


def measured(port: int, host: str, pids: dict[str, int], duration: int, connections: int) -> dict:
    """wrk to `port`, with the CPU each of `pids` spent meanwhile, per request."""
    c0 = {k: sum(cpu_s(pid)) for k, pid in pids.items()}
    r = wrk(port, duration, connections, host)
    n = max(1, r["requests"])
    r["cpu_us"] = {k: (sum(cpu_s(pid)) - c0[k]) / n * 1e6 for k, pid in pids.items()}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each measuring every path once (default 2)")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    tmp = Path(tempfile.mkdtemp(prefix="meshlens-bench-mtls-"))
    procs: list[subprocess.Popen] = []
    sidecars: list[ProxyProcess] = []
    control: ControlProcess | None = None
    results: dict[str, list[dict]] = {}
    try:
        certs = tmp / "certs"
        certificates(certs)
        up, up_port = nginx(tmp / "upstream", 'location / { return 200 "ok\\n"; }', worker_connections=4096)
        procs.append(up)
        ng: dict[str, tuple[int, dict[str, int]]] = {}  # path -> (port, the workers measured)
        for tls in (True, False):
            h2, h2_port = hop2(tmp / f"hop2-{tls}", certs, up_port, tls)
            procs.append(h2)
            variants = [("", True, True)] + ([(", handshake per request, resumed", False, True),
                                               (", handshake per request, no resumption", False, False)] if tls else [])
            for suffix, keepalive, reuse in variants:
                h1, h1_port = hop1(tmp / f"hop1-{tls}-{keepalive}-{reuse}", certs, h2_port, tls, keepalive, reuse)
                procs.append(h1)
                ng[f"nginx {'mTLS' if tls else 'plaintext'}{suffix}"] = (
                    h1_port, {"hop 1": worker(h1.pid), "hop 2": worker(h2.pid)})

        control = ControlProcess(tmp / "control").start()
        api_in, plain_in = free_port(), free_port()
        mesh = json.dumps({"services": {"web": {}, "api": {"instances": [
            {"address": f"127.0.0.1:{api_in}", "labels": {"security.istio.io/tlsMode": "istio"}}]},
            "plain": {"instances": [{"address": f"127.0.0.1:{plain_in}"}]}}})
        revision = apply(control, tmp, mesh, ONE_PER_CONNECTION, mode_doc("api", "observe"))
        common = ("--no-record", "--metrics-port", "-1")
        api = Sidecar(tmp / "api", None, "api", *common, "--app-port", str(up_port), "--inbound-port", str(api_in),
                      control=control.url)
        plain = Sidecar(tmp / "plain", None, "plain", *common, "--app-port", str(up_port), "--inbound-port",
                        str(plain_in), control=control.url)
        web = Sidecar(tmp / "web", None, "web", *common, control=control.url)
        web_cold = Sidecar(tmp / "web-cold", None, "web", *common, control=control.url, resume=False)
        for p in (api, plain, web, web_cold):
            sidecars.append(p.start())
        for p in sidecars:
            follow(p, revision, "observe")

        def api_mode(mode: str) -> None:
            """Calls to api in `mode` on both web sidecars (enforce: a new upstream connection every request)."""
            revision = apply(control, tmp, mesh, ONE_PER_CONNECTION, mode_doc("api", mode))
            for p in (web, web_cold):
                follow(p, revision, mode)

        def ml(client: ProxyProcess, server: ProxyProcess) -> dict[str, int]:
            return {"hop 1": client.proc.pid, "hop 2": server.proc.pid}

        steady = {"nginx mTLS": ng["nginx mTLS"], "meshlens mTLS": (web.outbound, ml(web, api)),
                  "nginx plaintext": ng["nginx plaintext"], "meshlens plaintext": (web.outbound, ml(web, plain))}
        hosts = {"meshlens mTLS": "api", "meshlens plaintext": "plain"}
        handshakes = {k: v for k, v in ng.items() if "handshake" in k}
        handshakes["meshlens mTLS, handshake per request, resumed"] = (web.outbound, ml(web, api))
        handshakes["meshlens mTLS, handshake per request, no resumption"] = (web_cold.outbound, ml(web_cold, api))
        for k in handshakes:
            if k.startswith("meshlens"):
                hosts[k] = "api"
        resumed: dict[str, list[float]] = {}

        print(f"wrk -t1 -c{args.connections} -d{args.duration}s, {os.cpu_count()} CPUs, {args.rounds} rounds, "
              f"nginx {subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip()}")

        def run(rnd: int, name: str, port: int, pids: dict[str, int]) -> None:
            host = hosts.get(name, "")
            wrk(port, 1, args.connections, host)  # warm-up: pools filled, sessions cached, code paths hot
            client = next((p for p in (web, web_cold) if p.outbound == port), None)
            before = admin(client, "stats") if client is not None else {}
            r = measured(port, host, pids, args.duration, args.connections)
            if client is not None and "handshake" in name:
                after = admin(client, "stats")
                new = after["upstream_cx_mtls"] - before["upstream_cx_mtls"]
                got = after.get("upstream_cx_mtls_resumed", 0) - before.get("upstream_cx_mtls_resumed", 0)
                r["resumed_share"] = got / new if new else 0.0
                r["per_request"] = new / max(1, r["requests"])
                resumed.setdefault(name, []).append(r["resumed_share"])
            results.setdefault(name, []).append(r)
            cpu = "  ".join(f"{k} {v:6.1f} us" for k, v in r["cpu_us"].items())
            extra = (f"  handshakes/request {r['per_request']:.2f}, resumed {100 * r['resumed_share']:.0f}%"
                     if "resumed_share" in r else "")
            print(f"  round {rnd} {name:54} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                  f"  {cpu}{extra}  {r['errors']}", flush=True)

        for rnd in range(1, args.rounds + 1):
            wrk(up_port, 1, args.connections)
            direct = wrk(up_port, args.duration, args.connections)
            results.setdefault("direct (nginx return 200)", []).append({**direct, "cpu_us": {}})
            print(f"  round {rnd} {'direct (nginx return 200)':54} {direct['rps']:8.0f} req/s  "
                  f"p50 {direct['p50_ms']:6.2f} ms  p99 {direct['p99_ms']:6.2f} ms", flush=True)
            order = list(steady.items())
            for name, (port, pids) in (order if rnd % 2 else order[::-1]):
                run(rnd, name, port, pids)
            api_mode("enforce")
            order = list(handshakes.items())
            for name, (port, pids) in (order if rnd % 2 else order[::-1]):
                run(rnd, name, port, pids)
            api_mode("observe")

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[name])

        direct_p99 = med("direct (nginx return 200)", "p99_ms")
        print(f"\n{'median of ' + str(args.rounds):54} {'req/s':>8} {'vs nginx':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'+p99 ms':>7}  CPU us/request (user+sys) per process")
        for name in results:
            peer = ("nginx mTLS" if "handshake" not in name else
                    "nginx mTLS, handshake per request, " + ("resumed" if name.endswith("resumed") else "no resumption"))
            cpu = "  ".join(f"{k} {statistics.median(r['cpu_us'][k] for r in results[name]):6.1f}"
                            for k in results[name][0]["cpu_us"])
            share = (f"  resumed {100 * statistics.median(resumed[name]):.0f}%" if name in resumed else "")
            errors = sum(1 for r in results[name] if r["errors"])
            print(f"{name:54} {med(name, 'rps'):8.0f} {med(name, 'rps') / med(peer, 'rps'):7.2f}x "
                  f"{med(name, 'p50_ms'):7.2f} {med(name, 'p99_ms'):7.2f} {med(name, 'p99_ms') - direct_p99:7.2f}  "
                  f"{cpu}{share}{f'  errors in {errors} runs' if errors else ''}")
        ml_rps, ng_rps = med("meshlens mTLS", "rps"), med("nginx mTLS", "rps")
        ml_add, ng_add = (med("meshlens mTLS", "p99_ms") - direct_p99), (med("nginx mTLS", "p99_ms") - direct_p99)
        print(f"goal: throughput >= 0.8x nginx mTLS: {ml_rps / ng_rps:.2f}x ({'met' if ml_rps >= 0.8 * ng_rps else 'missed'}); "
              f"added p99 <= 2x nginx's: {ml_add:.2f} ms vs {ng_add:.2f} ms = {ml_add / ng_add if ng_add > 0 else float('inf'):.2f}x "
              f"({'met' if ml_add <= 2 * ng_add else 'missed'})")
        for who in ("nginx", "meshlens"):
            a = med(f"{who} mTLS, handshake per request, resumed", "rps")
            b = med(f"{who} mTLS, handshake per request, no resumption", "rps")
            print(f"{who}: handshakes/s resumed {a:.0f}, full {b:.0f}: resumption {a / b:.2f}x")
    finally:
        for p in sidecars:
            p.stop()
            p.kill()
        if control is not None:
            control.stop()
            control.kill()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def sidecar_without_resumption(argv: list[str]) -> int:
    """`meshlens ARGV` with no TLS session kept (proxy/mtls.py MAX_SESSIONS = 0): each handshake a full one."""
    from meshlens.cli.main import main as meshlens
    from meshlens.proxy import mtls

    mtls.MAX_SESSIONS = 0  # type: ignore[attr-defined]
    return meshlens(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == [NO_RESUMPTION]:
        sys.exit(sidecar_without_resumption(sys.argv[2:]))
    main()

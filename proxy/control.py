"""The sidecar's side of the control plane: its snapshot long-polled, applied, acknowledged, and kept on disk.

`meshlens proxy --control URL` starts from the control plane's current snapshot or,
when the control plane cannot be reached, from the last one that applied cleanly
(kept at `cache_path`; Envoy forgets its configuration on restart, a sidecar here must
not). Then a thread long-polls `GET /v1/snapshot` with the version it has (a wait of
SNAPSHOT_WAIT_S with jitter), hands each new snapshot to the event loop, where
`Proxy.apply_snapshot` checks and applies it between two callbacks (atomically: no
connection or request in flight is touched), and reports ACK or NACK with the error
(`POST /v1/status`). A snapshot that applied is written to disk (a temporary file,
then renamed) before it is acknowledged. A NACKed version is polled with as the one
held, so the control plane answers again only when something changes. While the
control plane is away the sidecar keeps what it has and tries again with backoff
(RETRY_MIN_S doubling to RETRY_MAX_S, with jitter), logging once per outage.

A thread, not the loop: the poll is blocking I/O that releases the interpreter lock
while it waits, and the proxy's loop imports no HTTP client (RSS).
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import random
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from meshlens.collector.client import failure_reason

__all__ = ["RETRY_MAX_S", "RETRY_MIN_S", "SNAPSHOT_WAIT_S", "CertificateRefused", "ControlError", "ControlWatch",
           "IdentityWatch"]

log = logging.getLogger("meshlens.proxy.control")

# The long poll's wait, as the issue asks (~30 s), +-20 % jitter so that a fleet's polls spread out.
SNAPSHOT_WAIT_S = 30.0
# Back-off while the control plane is unreachable: a restarted one is found within RETRY_MAX_S.
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
# A snapshot's largest size: the control plane's own apply limit is 3 MiB of YAML; JSON of it is smaller.
MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024


class ControlError(Exception):
    """No snapshot to start from: the control plane is unreachable and none was kept."""


class CertificateRefused(Exception):
    """The control plane will not issue this sidecar a certificate (no CA there, or the request refused)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControlWatch:
    """One sidecar's subscription to the control plane."""

    def __init__(self, url: str, service: str, instance: str, cache_path: Path, *,
                 wait_s: float = SNAPSHOT_WAIT_S, token: str | None = None, ca: str | None = None) -> None:
        """`token`: the sidecar's bearer token; `ca`: the PEM file an https control plane is checked against."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control plane URL must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self._token = token
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._tls = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"cannot read CA file {ca}: {getattr(e, 'strerror', None) or e}") from None
        self.service, self.instance = service, instance
        self.cache_path = cache_path
        self.wait_s = wait_s
        # what /config shows
        self.version = ""
        """The version of the snapshot in force."""
        self.state = "starting"
        """ACK or NACK (the last snapshot received), cached (started from disk, not heard from since), starting."""
        self.error = ""
        self.mode = "observe"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apply: Callable[[dict[str, Any]], str] | None = None
        self._loop: Any = None
        self.holds: Callable[[], tuple[str, tuple[str, ...]]] | None = None
        """What this sidecar's certificate chains to and what it trusts (`IdentityWatch.holds`): told on each poll,
        for the root rotation's gate (control/rotation.py)."""

    def __repr__(self) -> str:
        return f"<ControlWatch {self.url} {self.service} version={self.version} {self.state}>"

    # -- before the proxy starts -----------------------------------------------------------------

    def initial(self, timeout: float = 5.0) -> dict[str, Any]:
        """The snapshot to start from: the control plane's, else the one kept on disk; ControlError if neither."""
        try:
            snap = self._poll("", timeout)
        except OSError as e:
            cached = self._cached()
            if cached is None:
                raise ControlError(f"cannot reach the control plane at {self.url} ({failure_reason(e)}) and no snapshot "
                                   f"was kept at {self.cache_path}") from None
            log.warning("control plane unreachable, starting from the last snapshot kept url=%s version=%s error=%s",
                        self.url, cached.get("version"), failure_reason(e))
            self.state = "cached"
            return cached
        assert snap is not None
        return snap

    def _cached(self) -> dict[str, Any] | None:
        try:
            snap = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return None
        return snap if isinstance(snap, dict) and "version" in snap else None

    # -- while it runs -----------------------------------------------------------------------------

    def start(self, loop: Any, apply: Callable[[dict[str, Any]], str], applied: dict[str, Any], error: str = "") -> None:
        """Poll from now on; `applied` is the snapshot in force (or refused, with `error`), `apply` runs on `loop`."""
        self._loop, self._apply = loop, apply
        self.version = str(applied.get("version", ""))
        if error:
            self.state, self.error = "NACK", error
        elif self.state != "cached":
            self.state = "ACK"
            self._keep(applied)
        self._thread = threading.Thread(target=self._run, name="meshlens-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self.state in ("ACK", "NACK"):
            self._report(self.state == "ACK")
        backoff, failing = RETRY_MIN_S, False
        while not self._stop.is_set():
            wait = self.wait_s * random.uniform(0.8, 1.2)
            try:
                # started from disk: ask for the control plane's snapshot now, even if it is the same version
                snap = self._poll("" if self.state == "cached" else self.version, wait)
            except OSError as e:
                if not failing:
                    log.warning("control plane unreachable, keeping version %s url=%s error=%s",
                                self.version, self.url, failure_reason(e))
                failing = True
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(RETRY_MAX_S, backoff * 2)
                continue
            except ValueError as e:  # not a snapshot at all: the control plane's bug, or not a control plane
                log.error("control plane answered what is not a snapshot url=%s error=%s", self.url, e)
                self._stop.wait(RETRY_MAX_S)
                continue
            if failing:
                log.info("control plane reachable again url=%s", self.url)
                failing, backoff = False, RETRY_MIN_S
            if snap is None:
                continue
            self._take(snap)

    def _take(self, snap: dict[str, Any]) -> None:
        version = str(snap.get("version", ""))
        done: concurrent.futures.Future[str] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                done.set_result(self._apply(snap))  # type: ignore[misc]
            except ValueError as e:
                done.set_exception(e)

        try:
            self._loop.call_soon_threadsafe(on_loop)
            mode = done.result(timeout=60)
        except RuntimeError:  # the loop closed: the proxy is stopping
            self._stop.set()
            return
        except ValueError as e:
            self.version, self.state, self.error = version, "NACK", str(e)
            log.warning("refused snapshot version=%s error=%s", version, e)
            self._report(False)
            return
        self.version, self.state, self.error, self.mode = version, "ACK", "", mode
        self._keep(snap)
        log.info("applied snapshot version=%s", version)
        self._report(True)

    def _keep(self, snap: dict[str, Any]) -> None:
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, self.cache_path)
        except OSError as e:
            log.warning("cannot keep the snapshot on disk path=%s error=%s", self.cache_path, e)

    # -- HTTP ---------------------------------------------------------------------------------------

    def _poll(self, version: str, wait: float) -> dict[str, Any] | None:
        """The snapshot, or None when it did not change within `wait`. OSError when unreachable."""
        params = {"service": self.service, "instance": self.instance, "version": version, "timeout": f"{wait:.1f}"}
        root, trusts = self.holds() if self.holds is not None else ("", ())
        if root:
            params.update(root=root, trusts=",".join(trusts))
        query = urllib.parse.urlencode(params)
        status, body = self._request("GET", f"/v1/snapshot?{query}", None, wait + 10)
        if status == 304:
            return None
        if status != 200:
            raise OSError(f"the control plane answered {status}: {body[:200].decode('utf-8', 'replace')}")
        snap = json.loads(body)
        if not isinstance(snap, dict) or not isinstance(snap.get("version"), str):
            raise ValueError("a snapshot is a JSON object with a version")
        return snap

    def certificate(self, csr: bytes) -> dict[str, Any]:
        """The control plane's CA's answer to a CSR (control/ca.py); CertificateRefused for a 4xx, OSError when
        it cannot be asked."""
        body = json.dumps({"service": self.service, "instance": self.instance, "csr": csr.decode()}).encode()
        status, data = self._request("POST", "/v1/certificate", body, 30)
        if 400 <= status < 500:
            try:
                message = str(json.loads(data)["error"])
            except (ValueError, KeyError, TypeError):
                message = data[:200].decode("utf-8", "replace")
            raise CertificateRefused(status, message)
        if status != 200:
            raise OSError(f"the control plane answered {status}: {data[:200].decode('utf-8', 'replace')}")
        got = json.loads(data)
        if not isinstance(got, dict) or not all(isinstance(got.get(k), str)
                                                for k in ("identity", "certificate_chain", "trust_bundle", "root")):
            raise OSError("the control plane's certificate answer lacks identity, certificate_chain, trust_bundle "
                          "or root")
        return got

    def _report(self, ack: bool) -> None:
        body = json.dumps({"service": self.service, "instance": self.instance, "version": self.version, "ack": ack,
                           "error": self.error, "mode": self.mode}).encode()
        try:
            self._request("POST", "/v1/status", body, 10)
        except OSError as e:  # told at the next report; the poll notices the outage
            log.debug("could not report to the control plane error=%s", e)

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        conn = (http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
                if self._tls is not None else http.client.HTTPConnection(self._host, self._port, timeout=timeout))
        headers = {"Content-Type": "application/json"} if body else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            data = resp.read(MAX_SNAPSHOT_BYTES + 1)
            if len(data) > MAX_SNAPSHOT_BYTES:
                raise OSError(f"snapshot larger than MAX_SNAPSHOT_BYTES={MAX_SNAPSHOT_BYTES}")
            return resp.status, data
        except http.client.HTTPException as e:
            raise OSError(f"not an HTTP answer: {e}") from None
        finally:
            conn.close()


class IdentityWatch:
    """The sidecar's workload certificate (proxy/identity.py `Workload`): asked for at start, renewed at half its
    life (a new key each time), installed on the event loop between two callbacks.

    While the control plane is away, the certificate in hand is kept and used, and asked for again with backoff
    (RETRY_MIN_S doubling to RETRY_MAX_S). Once it has expired the state says `expired`: no mTLS is originated
    with it (calls go plaintext: PERMISSIVE servers serve them, STRICT ones refuse them), and callers that reach
    this sidecar over mTLS are refused by their own sidecar (its certificate is expired), until the control plane
    answers again and a new one is installed. A control plane without a CA (404) is asked again every
    NO_CA_RETRY_S; a refused request (another 4xx: a revoked token, say) is logged and tried again at that pace.

    A root rotation reaches it in the snapshot's trust (`trust`, control/rotation.py): a new bundle rebuilds the
    contexts (for new connections; those open keep theirs), and a signer that is not the root its certificate
    chains to has it renewed now, after up to ROTATION_JITTER_S (so that a thousand sidecars do not ask at once)."""

    NO_CA_RETRY_S = 60.0
    ROTATION_JITTER_S = 1.0

    def __init__(self, watch: ControlWatch, workload: Any) -> None:
        self.watch, self.workload = watch, workload
        self.state = "none"
        """none (not asked yet), valid, renewing (due, not renewed yet), expired, refused, no-ca."""
        self.error = ""
        self.signer = ""
        """The root the control plane signs with now, as the last snapshot said ('' before one said)."""
        self.renewals = 0
        """Certificates installed since start (the first included)."""
        self._renewed_for = ""
        """The signer a renewal last succeeded under: a switch renews once per signer, however the CA answers."""
        self._stop = threading.Event()
        self._nudge = threading.Event()
        self._loop: Any = None
        self._thread: threading.Thread | None = None
        watch.holds = self.holds

    def __repr__(self) -> str:
        return f"<IdentityWatch {self.workload.identity or '-'} {self.state}>"

    def start(self, loop: Any) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="meshlens-identity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._nudge.set()

    def holds(self) -> tuple[str, tuple[str, ...]]:
        w = self.workload
        return w.root, w.trusts

    def trust(self, trust: Any) -> None:
        """A snapshot's trust (meshlens.policy.trust `Trust`), on the loop; ValueError (nothing changed) when its
        bundle does not load."""
        w = self.workload
        if w.identity and trust.bundle != w.bundle:
            w.retrust(trust.bundle)
            log.info("trust bundle replaced roots=%s", ",".join(r[:16] for r in w.trusts))
        self.signer = trust.signer
        if w.identity and w.root != trust.signer:
            self._nudge.set()

    def described(self) -> dict[str, Any]:
        w = self.workload
        state = self.state
        if state in ("valid", "renewing") and w.expires_at and time.time() >= w.expires_at:
            state = "expired"  # the renewal thread may be waiting out a backoff: the clock says it now
        return {"identity": w.identity, "state": state, "error": self.error,
                "not_after": w.not_after.isoformat() if w.not_after else None, "root": w.root,
                "trusts": list(w.trusts), "renewals": self.renewals}

    def _due_in(self, now: Any) -> float:
        w = self.workload
        if self.signer and w.root and w.root != self.signer and self._renewed_for != self.signer:
            return 0.0  # a rotation switched the signer
        return w.renew_in(now)

    def _run(self) -> None:
        import datetime as dt

        backoff = RETRY_MIN_S
        while not self._stop.is_set():
            now = dt.datetime.now(dt.timezone.utc)
            wait = self._due_in(now)
            if wait > 0:
                self._nudge.wait(wait)
                if self._nudge.is_set() and not self._stop.is_set():
                    self._nudge.clear()
                    self._stop.wait(random.uniform(0, self.ROTATION_JITTER_S))
                continue
            self._nudge.clear()
            if self.workload.not_after is not None:
                self.state = "expired" if now >= self.workload.not_after else "renewing"
            try:
                self._renew()
            except CertificateRefused as e:
                self.error = str(e)
                if self.workload.not_after is None or now >= self.workload.not_after:
                    self.state = "no-ca" if e.status == 404 else "refused"  # else: renewing, the one in hand good
                log.warning("no workload certificate status=%d error=%s", e.status, e)
                self._stop.wait(self.NO_CA_RETRY_S * random.uniform(0.8, 1.2))
                continue
            except (OSError, ValueError) as e:
                self.error = failure_reason(e) if isinstance(e, OSError) else str(e)
                log.warning("cannot renew the workload certificate, keeping the one in hand not_after=%s error=%s",
                            self.workload.not_after, self.error)
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(RETRY_MAX_S, backoff * 2)
                continue
            backoff = RETRY_MIN_S

    def _renew(self) -> None:
        signer = self.signer
        csr, key = self.workload.csr()
        got = self.watch.certificate(csr)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                self.workload.install(got["identity"], got["certificate_chain"], got["trust_bundle"], key,
                                      got["root"])
                self.state, self.error = "valid", ""  # with the certificate, as /config (on the loop) reads them
                self.renewals += 1
                self._renewed_for = signer
                done.set_result(None)
            except ValueError as e:
                done.set_exception(e)

        try:
            self._loop.call_soon_threadsafe(on_loop)
            done.result(timeout=60)
        except RuntimeError:  # the loop closed: the proxy is stopping
            self._stop.set()
            return
        log.info("workload certificate installed identity=%s not_after=%s root=%s", self.workload.identity,
                 self.workload.not_after, self.workload.root[:16])

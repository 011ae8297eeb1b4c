"""The control plane's HTTP API (aiohttp): resources, modes and their history, as JSON.

    GET    /healthz                                  ok
    GET    /console/                                 the web console's page and its assets, no token needed: its
                              scripts read GET /v1/console/... with the user's token (control/console/endpoints.py)
    GET    /v1/resources[?kind=K]                    {"revision": r, "items": [resource, ...]}
    GET    /v1/resources/{kind}/{name}               resource            (name: namespace/name for Istio's kinds)
    POST   /v1/apply          body: YAML, or JSON {"files": [...]}      {"revision": r, "results": [...]}
                              ?dry_run=true: what it would change (each result with before, after)
                              ?force=true: past the readiness gate (control/gate.py; also on PUT /v1/modes)
    DELETE /v1/resources/{kind}/{name}                                   {"revision": r}
    GET    /v1/modes[/{service}]                     {"revision": r, "modes": {service: mode}}
    PUT    /v1/modes/{service}  {"mode": M, "reason": "...", "guard": {...}}   {"revision": r, "action": ...}
                              guard (with "enforce" only): enforce watched against dry-run's calls, and switched
                              back by itself if it made them worse (control/guard.py); every field optional:
                              {"window": "5m", "interval": "5s", "min_calls": 100, "max_error_increase": 1 (pp),
                              "max_p99_ratio": 1.5, "min_p99_increase": "5ms"}; 409 naming what is missing
                              (no --calls-store, not in dry-run, too few calls), 503 when the calls cannot be
                              read; the answer has "guard": its state. A switch away from enforce by hand ends
                              a running guard (cancelled) in the same change
    GET    /v1/guards[/{service}]                    {"revision": r, "guards": [...]}: each guard's settings,
                              baseline, last figures in enforce, time left, and outcome (running, passed,
                              rolled-back, inconclusive, cancelled) with why
    GET    /v1/history[?kind=K&name=N&service=S&limit=L]   {"revision": r, "entries": [...]}
                              (K: a kind, or one the control plane writes: TrustBundle, Guard)
    GET    /v1/watch?after=R[&timeout=S]             {"revision": r}: answered once the revision passes R
    GET    /v1/snapshot?service=S&instance=I&version=V[&timeout=T]   a sidecar's long poll (control/distribution.py)
    POST   /v1/status   {"service", "instance", "version", "ack", "error", "mode"}   its ACK or NACK
    GET    /v1/status                                {"revision": r, "sidecars": [...]}
    POST   /v1/certificate  {"service": S, "instance": I, "csr": PEM}   a workload certificate (control/ca.py):
                              {"identity", "certificate_chain", "trust_bundle", "not_after", "root"}
    GET    /v1/trust-bundle                          the roots workload certificates chain to (PEM)
    GET    /v1/ca                                    the roots, a rotation's state, what each sidecar holds
    POST   /v1/ca/rotate  {"step": "begin"|"switch"|"finish", "reason"}[?force=true]   a root rotation's step
                              (control/ca.py; refused 409 naming the sidecars it would break: control/rotation.py)

A workload certificate is issued for the identity the stored Mesh gives the service, to a
sidecar token bound to that service (or a write token; anyone on loopback without tokens).
A resource is {"kind", "name", "revision", "doc"}. With tokens (control/auth.py) every
request but /healthz carries `Authorization: Bearer TOKEN`, and a change is the token's
name's; without, the control plane listens on loopback only and a change is the
`X-Meshlens-User` the caller names (the CLI sends the local user). Why is the
`X-Meshlens-Reason` header or the body's `reason`. Every refusal is a 4xx with {"error": one line}; an
apply stores all its documents or none. A service's mode can be set only for a
service the stored Mesh defines.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from meshlens.policy.resources import (CONTROL_PLANE_KINDS, KINDS, MODES, Resource, ResourceError, check_references,
                                        mode_resource, parse_documents)
from meshlens.control.auth import Tokens
from meshlens.control.ca import CA, MAX_CSR_BYTES, ROTATION_STEPS, CAError
from meshlens.control.distribution import Sidecars, Snapshots
from meshlens.control import console, guard, rotation
from meshlens.control.rotation import RotationRefused, check_step, trust_resource
from meshlens.control.store import Change, Store, StoreUnavailable
from meshlens.policy.trust import fingerprint

__all__ = ["MAX_APPLY_BYTES", "MAX_WATCH_S", "build_app"]

log = logging.getLogger("meshlens.control")

# An apply body: kubectl's default --request-size limit is 3 MiB (etcd's request limit is 1.5 MiB).
MAX_APPLY_BYTES = 3 * 1024 * 1024
# The longest a watch is held: sidecars ask again after it (~30 s, as the long poll).
MAX_WATCH_S = 60.0
_HISTORY_LIMIT = 1000


def build_app(store: Store, tokens: Tokens | None = None, ca: CA | None = None,
              calls_store: str | None = None) -> web.Application:
    """`tokens`: who may do what (control/auth.py); None: everyone who can reach it (loopback only).
    `ca`: the mesh's CA (control/ca.py); None: no certificates issued."""
    app = web.Application(client_max_size=MAX_APPLY_BYTES, middlewares=[_errors, _auth])
    app["store"] = store
    app["tokens"] = tokens
    app["ca"] = ca
    app["calls_store"] = calls_store
    """Where the readiness gate and the guards read the recorded calls (control/gate.py, control/guard.py)."""
    app["guards"] = guard.GuardRunner(store, calls_store)
    app.on_startup.append(_start_guards)
    app.on_shutdown.append(_release_long_polls)
    app.on_cleanup.append(_stop_guards)
    app["sidecars"] = Sidecars()
    app["snapshots"] = Snapshots()
    app["certificates"] = {"issued": 0, "refused": 0}
    if ca is not None:
        app.on_startup.append(_publish_trust)
    app.add_routes([
        web.get("/healthz", _healthz),
        web.get("/v1/resources", _list),
        web.get("/v1/resources/{kind}/{name:.+}", _get),
        web.delete("/v1/resources/{kind}/{name:.+}", _delete),
        web.post("/v1/apply", _apply),
        web.get("/v1/modes", _modes),
        web.get("/v1/modes/{service}", _modes),
        web.put("/v1/modes/{service}", _set_mode),
        web.get("/v1/guards", _guards),
        web.get("/v1/guards/{service}", _guards),
        web.get("/v1/history", _history),
        web.get("/v1/watch", _watch),
        web.get("/v1/snapshot", _snapshot),
        web.get("/v1/status", _status),
        web.post("/v1/status", _report),
        web.post("/v1/certificate", _certificate),
        web.get("/v1/trust-bundle", _trust_bundle),
        web.get("/v1/ca", _ca_status),
        web.post("/v1/ca/rotate", _rotate),
    ])
    console.add_routes(app)
    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Refused as e:
        return web.json_response({"error": str(e)}, status=e.status)
    except ResourceError as e:
        return web.json_response({"error": str(e)}, status=400)
    except StoreUnavailable as e:
        log.warning("store unavailable error=%s", e)
        return web.json_response({"error": str(e)}, status=503, headers={"Retry-After": "1"})
    except web.HTTPException as e:
        if e.status >= 400:  # aiohttp's own (404 route, 405, 413): in the same shape as ours
            return web.json_response({"error": e.reason if e.status != 413 else
                                      f"request body exceeds MAX_APPLY_BYTES={MAX_APPLY_BYTES}"}, status=e.status)
        raise


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_SIDECAR_PATHS = {("GET", "/v1/snapshot"), ("POST", "/v1/status"), ("POST", "/v1/certificate")}


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    tokens: Tokens | None = request.app["tokens"]
    if tokens is None or request.path == "/healthz" or console.is_page(request.path):
        return await handler(request)  # the console's pages hold no data: their scripts ask the API with a token
    token = tokens.find(request.headers.get("Authorization"))
    if token is None:
        if request.path == "/v1/certificate":  # a revoked sidecar token, say: counted with the CA's refusals
            request.app["certificates"]["refused"] += 1
        raise _Refused(401, "this control plane needs a token: Authorization: Bearer TOKEN "
                            "(the CLI's --token or MESHLENS_TOKEN; a sidecar's --control-token)")
    action = ("sidecar" if (request.method, request.path) in _SIDECAR_PATHS else
              "read" if request.method in ("GET", "HEAD") else "write")
    if not token.may(action):
        raise _Refused(403, f"token {token.name!r} (role {token.role}) may not {_WHAT[action]}")
    request["token"] = token
    return await handler(request)


_WHAT = {"read": "read", "write": "change anything", "sidecar": "take a sidecar's snapshot or report for one"}


def _for_service(request: web.Request, service: str) -> None:
    """A sidecar's token names its one service: it may not ask for another's snapshot or report as it."""
    token = request.get("token")
    if token is not None and not token.may("sidecar", service):
        raise _Refused(403, f"token {token.name!r} is {token.service!r}'s sidecar token, not {service!r}'s")


def _store(request: web.Request) -> Store:
    return request.app["store"]


def _change(request: web.Request, reason: str | None = None) -> Change:
    token = request.get("token")  # with tokens, a change is the token's; without, the user the CLI names
    who = token.name if token is not None else request.headers.get("X-Meshlens-User", "").strip() or "anonymous"
    reason = reason if reason is not None else unquote(request.headers.get("X-Meshlens-Reason", ""))
    return Change(who[:200], reason[:2000])


def _kind(request: web.Request) -> str:
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise _Refused(404, f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


def _item(res: Resource) -> dict[str, Any]:
    return {"kind": res.kind, "name": res.name, "revision": res.revision, "doc": res.doc}


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _list(request: web.Request) -> web.Response:
    kind = request.query.get("kind")
    if kind is not None and kind not in KINDS:
        raise _Refused(400, f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    store = _store(request)
    return web.json_response({"revision": await store.revision(), "items": [_item(r) for r in await store.list(kind)]})


async def _get(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    res = await _store(request).get(kind, name)
    if res is None:
        raise _Refused(404, f"no {kind} {name!r}")
    return web.json_response(_item(res))


async def _apply(request: web.Request) -> web.Response:
    """A YAML body (its name in X-Meshlens-Source), or JSON {"files": [{"source": ..., "text": ...}, ...]}:
    several files in one change, so that a route in one may name a subset defined in another."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Refused(400, f"apply body is not UTF-8 text (byte {e.start})") from None
    if request.content_type == "application/json":
        files = _files(text)
    else:
        files = [(request.headers.get("X-Meshlens-Source", "request")[:200], text)]
    resources: list[Resource] = []
    seen: dict[tuple[str, str], str] = {}
    for source, body in files:
        docs = parse_documents(body, source)
        if not docs:
            raise _Refused(400, f"{source}: no documents to apply")
        for r in docs:
            if r.key in seen:
                raise _Refused(400, f"{r.source}: {r.kind} {r.name} is also in {seen[r.key]}")
            seen[r.key] = r.source
        resources += docs
    store = _store(request)
    await _check_modes(store, resources, files[0][0] if len(files) == 1 else "apply")
    applied = {r.key for r in resources}
    stored = await store.list()
    more = check_references([r for r in stored if r.key not in applied] + resources)
    resources = [replace(r, warnings=r.warnings + more.get(r.key, ())) for r in resources]
    if request.query.get("dry_run") == "true":  # meshlens diff: what this apply would change, nothing stored
        before = {r.key: r for r in stored}
        return web.json_response({"revision": await store.revision(), "results": [
            {"kind": r.kind, "name": r.name, "action": _would(before.get(r.key), r), "warnings": list(r.warnings),
             "before": before[r.key].doc if r.key in before else None, "after": r.doc} for r in resources]})
    await _gate(request, stored, [r for r in stored if r.key not in applied] + resources)
    results = await store.put(resources, _change(request))
    for res, action in results:
        if action != "unchanged":
            log.info("applied kind=%s name=%s action=%s revision=%d", res.kind, res.name, action, res.revision)
    return web.json_response({"revision": await store.revision(), "results": [
        {"kind": r.kind, "name": r.name, "revision": r.revision, "action": a, "warnings": list(r.warnings)}
        for r, a in results]})


async def _gate(request: web.Request, before: list[Resource], after: list[Resource]) -> None:
    """A change that would enforce STRICT on a service with plaintext callers is refused (409), unless ?force=true."""
    from meshlens.control.gate import GateRefused, check

    try:
        await check(before, after, request.app["calls_store"], request.query.get("force") == "true")
    except GateRefused as e:
        raise _Refused(409, str(e)) from None


def _would(old: Resource | None, new: Resource) -> str:
    if old is None:
        return "created"
    same = json.dumps(old.doc, sort_keys=True) == json.dumps(new.doc, sort_keys=True)
    return "unchanged" if same else "configured"


def _files(text: str) -> list[tuple[str, str]]:
    try:
        body = json.loads(text)
        files = body["files"]
        out = [(str(f["source"])[:200], f["text"]) for f in files]
    except (ValueError, KeyError, TypeError):
        raise _Refused(400, 'expected JSON {"files": [{"source": NAME, "text": YAML}, ...]}') from None
    if not out or not all(isinstance(t, str) for _, t in out) or set(body) - {"files"}:
        raise _Refused(400, 'expected JSON {"files": [{"source": NAME, "text": YAML}, ...]}')
    return out


async def _check_modes(store: Store, resources: list[Resource], source: str) -> None:
    """A Mode names a service of the Mesh being applied with it, else of the stored one."""
    modes = [r for r in resources if r.kind == "Mode"]
    if not modes:
        return
    meshes = [r for r in resources if r.kind == "Mesh"] or [m for m in [await store.get("Mesh", "mesh")] if m is not None]
    services = set(meshes[0].doc["spec"].get("services") or {}) if meshes else set()
    for res in modes:
        if res.name not in services:
            where = f"{source}: Mode {res.name}: " if source else ""
            raise _Refused(400, f"{where}no service {res.name!r} in the mesh"
                                + ("" if meshes else " (no Mesh is stored: apply one first)"))


async def _delete(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    store = _store(request)
    try:  # what stays must still hold together: a subset still routed to keeps its DestinationRule
        check_references([r for r in await store.list() if r.key != (kind, name)])
    except ResourceError as e:
        raise _Refused(409, f"deleting {kind} {name} would leave {e}") from None
    revision = await store.delete(kind, name, _change(request))
    if revision is None:
        raise _Refused(404, f"no {kind} {name!r}")
    log.info("deleted kind=%s name=%s revision=%d", kind, name, revision)
    return web.json_response({"revision": revision})


async def _modes(request: web.Request) -> web.Response:
    store = _store(request)
    modes = {r.name: r.doc["spec"]["mode"] for r in await store.list("Mode")}
    mesh = await store.get("Mesh", "mesh")
    for service in (mesh.doc["spec"].get("services") or {}) if mesh else ():
        modes.setdefault(service, "observe")  # a service nobody switched is observed
    service = request.match_info.get("service")
    if service is not None:
        if service not in modes:
            raise _Refused(404, f"no service {service!r} in the mesh")
        modes = {service: modes[service]}
    return web.json_response({"revision": await store.revision(), "modes": dict(sorted(modes.items()))})


async def _set_mode(request: web.Request) -> web.Response:
    shape = 'expected a JSON body {"mode": ..., "reason": ..., "guard": {...} (optional)}'
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _Refused(400, shape) from None
    if not isinstance(body, dict) or set(body) - {"mode", "reason", "guard"} or "mode" not in body:
        raise _Refused(400, shape)
    mode, reason = body["mode"], body.get("reason", "")
    if mode not in MODES:
        raise _Refused(400, f"unknown mode {mode!r} (known: {', '.join(MODES)})"[:300])
    if not isinstance(reason, str):
        raise _Refused(400, "reason must be a string")
    settings = None
    if "guard" in body:
        if mode != "enforce":
            raise _Refused(400, f"a guard watches a switch to enforce, not to {mode}")
        try:
            settings = guard.read_settings(body["guard"])
        except guard.GuardError as e:
            raise _Refused(400, str(e)) from None
    service = request.match_info["service"]
    try:
        res = mode_resource(service, mode)
    except ResourceError:
        raise _Refused(400, f"{service!r} is not a service name (lowercase letters, digits, '-' and '.')") from None
    store, change = _store(request), _change(request, reason)
    await _check_modes(store, [res], "")
    watched = await _begin_guard(request, service, settings, change) if settings is not None else None
    before = await store.list()
    await _gate(request, before, [r for r in before if r.key != res.key] + [res])
    runner: guard.GuardRunner = request.app["guards"]
    if watched is not None:  # read again just before the write: the baseline took a while
        if await guard.mode_of(store, service) != "dry-run":
            raise _Refused(409, f"the mode of {service} changed while its baseline was read; nothing changed")
        resources = [res, watched]
    else:  # a hand switch ends a running guard, in the same change
        resources = [res, *await runner.ended_by_hand(service, mode, change)]
    [(stored, action), *more] = await store.put(resources, change)
    runner.wake()
    if action != "unchanged":
        log.info("mode set service=%s mode=%s guarded=%s revision=%d", service, mode, watched is not None,
                 stored.revision)
    out = {"revision": stored.revision, "action": action, "service": service, "mode": mode}
    if watched is not None:
        out["guard"] = guard.status(more[0][0], None, time.time())
    return web.json_response(out)


async def _begin_guard(request: web.Request, service: str, settings: guard.Settings, change: Change) -> Resource:
    try:
        return await guard.begin(_store(request), request.app["calls_store"], service, settings, change)
    except guard.GuardRefused as e:
        raise _Refused(409, str(e)) from None
    except guard.CallsUnreadable as e:
        raise _Refused(503, f"{e}; nothing changed") from None


async def _guards(request: web.Request) -> web.Response:
    store, runner = _store(request), request.app["guards"]
    service = request.match_info.get("service")
    if service is None:
        found = await store.list(guard.KIND)
    else:
        one = await store.get(guard.KIND, service)
        if one is None:
            raise _Refused(404, f"no guard for {service!r} (meshlens mode set {service} enforce --guard)"[:300])
        found = [one]
    now = time.time()
    return web.json_response({"revision": await store.revision(),
                              "guards": [guard.status(r, runner.progress_of(r), now) for r in found]})


async def _release_long_polls(app: web.Application) -> None:
    """Stopping, once the listener is closed: the long polls that came in since the process was told to stop (while
    it shipped its last changes) are answered now, else the runner would wait up to their timeout for them."""
    app["store"].release_waiters()


async def _start_guards(app: web.Application) -> None:
    app["guards"].start()


async def _stop_guards(app: web.Application) -> None:
    await app["guards"].stop()


async def _history(request: web.Request) -> web.Response:
    q = request.query
    kind = q.get("kind")
    if kind is not None and kind not in KINDS + CONTROL_PLANE_KINDS:
        raise _Refused(400, f"unknown kind {kind!r} (known: {', '.join(KINDS + CONTROL_PLANE_KINDS)})"[:300])
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise _Refused(400, f"limit must be a whole number, not {q.get('limit')!r}") from None
    if not 1 <= limit <= _HISTORY_LIMIT:
        raise _Refused(400, f"limit must be 1 to {_HISTORY_LIMIT}")
    store = _store(request)
    entries = await store.history(kind, q.get("name"), limit, q.get("service"))
    return web.json_response({"revision": await store.revision(), "entries": [e.as_dict() for e in entries]})


async def _watch(request: web.Request) -> web.Response:
    q = request.query
    try:
        after = int(q.get("after", "0"))
        timeout = float(q.get("timeout", "30"))
    except ValueError:
        raise _Refused(400, "after must be a revision (a whole number) and timeout seconds") from None
    if not 0 <= timeout <= MAX_WATCH_S:
        raise _Refused(400, f"timeout must be 0 to {MAX_WATCH_S:g} seconds")
    return web.json_response({"revision": await _store(request).wait(after, timeout)})


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")


def _ident(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _Refused(400, f"{what} must be 1-200 of A-Z a-z 0-9 . _ : @ / -, not {value!r}"[:300])
    return value


async def _snapshot(request: web.Request) -> web.StreamResponse:
    q = request.query
    service, instance = _ident(q.get("service"), "service"), _ident(q.get("instance"), "instance")
    _for_service(request, service)
    version = q.get("version", "")
    try:
        timeout = float(q.get("timeout", "30"))
    except ValueError:
        raise _Refused(400, "timeout must be seconds") from None
    if not 0 <= timeout <= MAX_WATCH_S:
        raise _Refused(400, f"timeout must be 0 to {MAX_WATCH_S:g} seconds")
    root, trusts = q.get("root", ""), tuple(t for t in q.get("trusts", "").split(",") if t)
    if root and not _FINGERPRINT.fullmatch(root) or len(trusts) > 8 or not all(map(_FINGERPRINT.fullmatch, trusts)):
        raise _Refused(400, "root and trusts must be SHA-256 fingerprints in hex (trusts: up to 8, comma-separated)")
    store, sidecars = _store(request), request.app["sidecars"]
    sidecars.polled(service, instance, version, root, trusts)
    if version == str(await store.revision()):
        await store.wait(int(version), timeout)
        if version == str(await store.revision()):
            return web.Response(status=304)
    return web.Response(body=await request.app["snapshots"].body(store), content_type="application/json")


async def _report(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    keys = {"service", "instance", "version", "ack", "error", "mode"}
    if not isinstance(body, dict) or set(body) != keys or not isinstance(body["ack"], bool) \
            or not all(isinstance(body[k], str) for k in ("version", "error", "mode")):
        raise _Refused(400, 'expected JSON {"service", "instance", "version", "ack": true|false, "error", "mode"}')
    _for_service(request, _ident(body["service"], "service"))
    request.app["sidecars"].reported(_ident(body["service"], "service"), _ident(body["instance"], "instance"),
                                     body["version"][:40], body["ack"], body["error"][:1000], body["mode"][:20])
    if not body["ack"]:
        log.warning("sidecar refused snapshot service=%s instance=%s version=%s error=%s", body["service"],
                    body["instance"], body["version"], body["error"][:300])
    return web.json_response({"ok": True})


async def _status(request: web.Request) -> web.Response:
    store = _store(request)
    desired = {r.name: r.doc["spec"]["mode"] for r in await store.list("Mode")}
    sidecars = [{**s, "desired_mode": desired.get(s["service"], "observe")} for s in request.app["sidecars"].listed()]
    return web.json_response({"revision": await store.revision(), "sidecars": sidecars})


def _ca(request: web.Request) -> CA:
    ca = request.app["ca"]
    if ca is None:
        raise _Refused(404, "this control plane issues no certificates (it was started without a CA)")
    return ca


async def _certificate(request: web.Request) -> web.Response:
    ca = _ca(request)
    raw = await request.content.read(MAX_CSR_BYTES * 2 + 1)
    if len(raw) > MAX_CSR_BYTES * 2:
        raise _Refused(413, f"a certificate request is at most MAX_CSR_BYTES={MAX_CSR_BYTES} of PEM")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or not {"service", "csr"} <= set(body) <= {"service", "instance", "csr"} \
            or not isinstance(body["csr"], str):
        raise _Refused(400, 'expected JSON {"service": NAME, "instance": ID, "csr": '
                            '"-----BEGIN CERTIFICATE REQUEST-----..."}')
    service = _ident(body["service"], "service")
    instance = _ident(body["instance"], "instance") if "instance" in body else None
    token = request.get("token")
    if token is not None and token.role == "sidecar" and token.service is None:
        raise _Refused(403, f"token {token.name!r} is bound to no service: it may not be given an identity")
    _for_service(request, service)
    stored = await _store(request).get("Mesh", "mesh")
    from meshlens.mesh import MeshError, parse

    try:
        svc = parse(stored.doc["spec"]).service(service) if stored is not None else None
    except MeshError:
        svc = None
    if svc is None:
        raise _Refused(404, f"no service {service!r} in the stored mesh: it has no identity to be given")
    identity = ca.identity(svc.namespace, svc.identity_account)
    try:
        issued = ca.sign(body["csr"].encode("utf-8", "replace"), identity)
    except CAError as e:
        request.app["certificates"]["refused"] += 1
        log.warning("refused a certificate request service=%s identity=%s error=%s", service, identity, e)
        raise _Refused(400, str(e)) from None
    request.app["certificates"]["issued"] += 1
    if instance is not None:  # what it holds now, for the rotation's gate, before its next poll says so
        request.app["sidecars"].certified(service, instance, issued.root, tuple(fingerprint(r) for r in ca.roots))
    log.info("issued a workload certificate service=%s identity=%s not_after=%s", service, identity,
             issued.not_after.isoformat())
    return web.json_response({"identity": issued.identity, "certificate_chain": issued.certificate_chain,
                              "trust_bundle": issued.trust_bundle, "not_after": issued.not_after.isoformat(),
                              "root": issued.root})


async def _trust_bundle(request: web.Request) -> web.Response:
    return web.Response(text=_ca(request).bundle(), content_type="application/x-pem-file")


async def _publish_trust(app: web.Application) -> None:
    """The CA's trust into the store when it is not what is stored (the user's files changed between two starts:
    their rotation's steps), so that sidecars get it with their next snapshot. Nothing is stored for a CA of one
    root with none stored before: sidecars get its bundle with their certificates."""
    store, ca = app["store"], app["ca"]
    res = trust_resource(ca)
    stored = await store.get(res.kind, res.name)
    if stored is None and len(ca.roots) == 1 and ca.rotation == "none":
        return
    await store.put([res], Change("control-plane", "the CA's trust at start"))


async def _ca_status(request: web.Request) -> web.Response:
    return web.json_response(rotation.status(_ca(request), request.app["sidecars"].listed(),
                                             request.app["certificates"]))


async def _rotate(request: web.Request) -> web.Response:
    ca = _ca(request)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict) or body.get("step") not in ROTATION_STEPS or not set(body) <= {"step", "reason"} \
            or not isinstance(body.get("reason", ""), str):
        raise _Refused(400, f'expected JSON {{"step": one of {", ".join(ROTATION_STEPS)}, "reason": "..."}}')
    step = body["step"]
    if request.query.get("force") != "true":
        try:
            check_step(step, ca, request.app["sidecars"].listed())
        except RotationRefused as e:
            raise _Refused(409, str(e)) from None
    try:
        ca.rotate(step)
    except CAError as e:
        raise _Refused(409, str(e)) from None
    except OSError as e:
        raise _Refused(500, f"the CA's files: {e.strerror or e}") from None
    [(res, _)] = await _store(request).put([trust_resource(ca)], _change(request, body.get("reason", "") or
                                                                         f"root rotation: {step}"))
    log.info("root rotation step=%s rotation=%s revision=%d", step, ca.rotation, res.revision)
    return web.json_response({"revision": res.revision, "rotation": ca.rotation})

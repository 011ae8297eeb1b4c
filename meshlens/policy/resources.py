"""What the control plane stores: documents of known kinds, read from the YAML people already write.

Kinds (Istio's APIs under any of the versions Istio serves, plus meshlens' own):

    Mesh                   meshlens.io/v1alpha1    the mesh definition (mesh.yaml's format: `services:`);
                                                   a document that is only `services:` is read as one
    VirtualService         networking.istio.io/{v1alpha3,v1beta1,v1}
    DestinationRule        networking.istio.io/{v1alpha3,v1beta1,v1}
    PeerAuthentication     security.istio.io/{v1beta1,v1}
    AuthorizationPolicy    security.istio.io/{v1beta1,v1}
    LocalRateLimit         meshlens.io/v1alpha1    (Istio has no API for it; Envoy's token bucket)
    Mode                   meshlens.io/v1alpha1    a service's mode: observe, dry-run or enforce

Kinds the control plane writes itself and nobody applies (CONTROL_PLANE_KINDS, meshlens.io/v1alpha1):

    TrustBundle            the CA's roots, in every snapshot (meshlens/policy/trust.py, control/rotation.py)
    Guard                  a guarded switch to enforce: its baseline, bounds and outcome (control/guard.py);
                           in no snapshot: sidecars have nothing to do with it

A document is checked here for what makes it a resource (apiVersion, kind, a name, a
`spec` mapping; a Mesh through meshlens.mesh), and every error names the source, the
document's number and its line. What each kind's spec means is checked by its own
module as it comes to be enforced; until then a spec is stored as written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from meshlens.mesh import CONTROL_MODES

__all__ = ["API_VERSIONS", "CONTROL_PLANE_KINDS", "KINDS", "MODES", "Resource", "ResourceError", "check_references",
           "mode_resource", "read_document", "parse_documents"]

MODES = CONTROL_MODES

_ISTIO_NET = ("networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1")
_ISTIO_SEC = ("security.istio.io/v1beta1", "security.istio.io/v1")
_OURS = ("meshlens.io/v1alpha1",)
API_VERSIONS: dict[str, tuple[str, ...]] = {
    "Mesh": _OURS,
    "VirtualService": _ISTIO_NET,
    "DestinationRule": _ISTIO_NET,
    "PeerAuthentication": _ISTIO_SEC,
    "AuthorizationPolicy": _ISTIO_SEC,
    "LocalRateLimit": _OURS,
    "Mode": _OURS,
}
KINDS: tuple[str, ...] = tuple(API_VERSIONS)
CONTROL_PLANE_KINDS: tuple[str, ...] = ("TrustBundle", "Guard")
# Kubernetes' names: a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.'), 253 characters at most.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_TOP = {"apiVersion", "kind", "metadata", "spec"}
_METADATA = {"name", "namespace", "labels", "annotations"}
DEFAULT_NAMESPACE = "default"


class ResourceError(ValueError):
    """A document that cannot be stored; the message names the source, the document and the line."""


@dataclass(frozen=True)
class Resource:
    """One stored document: its kind and name (namespace/name for namespaced kinds), as written."""

    kind: str
    name: str
    """`namespace/name` for Istio's kinds (their namespace defaults to `default`); the name alone for meshlens'."""
    doc: dict[str, Any]
    """The whole document, as given (apiVersion, kind, metadata, spec)."""
    revision: int = 0
    """The store's revision at which it last changed (0: not stored yet)."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    source: str = field(default="", compare=False)
    """Where it was read: 'FILE document N (line L)' (not stored)."""
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, compare=False, repr=False)
    """Line of each path into the document, as read (not stored)."""

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.name

    def at(self, path: tuple[Any, ...]) -> str:
        """'SOURCE: spec.http[0].route[1].weight (line 23)' for a path into the spec."""
        full = ("spec", *path)
        line = next((self.lines[full[:n]] for n in range(len(full), 0, -1) if full[:n] in self.lines), None)
        text = "spec" + "".join(_step(p) for p in path)
        return f"{self.source or self.kind + ' ' + self.name}: {text}" + (f" (line {line})" if line else "")


def mode_resource(service: str, mode: str) -> Resource:
    """The Mode document for `service`, checked."""
    doc = {"apiVersion": _OURS[0], "kind": "Mode", "metadata": {"name": service}, "spec": {"mode": mode}}
    return _resource(doc, "mode")


def parse_documents(text: str, source: str) -> list[Resource]:
    """Every document of a (multi-document) YAML text, checked; the first error raises ResourceError.

    Empty documents are skipped, as kubectl does."""
    import yaml

    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ResourceError(f"{source}{where}: invalid YAML: {problem}") from None
    out: list[Resource] = []
    seen: dict[tuple[str, str], int] = {}
    for i, node in enumerate(nodes, 1):
        if node is None:
            continue
        where = f"{source} document {i} (line {node.start_mark.line + 1})"
        loader = yaml.SafeLoader("")
        try:
            doc = loader.construct_document(node)
        except yaml.YAMLError as e:
            raise ResourceError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
        finally:
            loader.dispose()
        if doc is None:
            continue
        res = _resource(doc, where, _lines(node), f"{source} document {i}")
        if res.key in seen:
            raise ResourceError(f"{where}: {res.kind} {res.name} is also document {seen[res.key]}")
        seen[res.key] = i
        out.append(res)
    return out


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _step(key: Any) -> str:
    """One step of a path as written: .name, [3], or ['odd key'] (quoted, so a message stays one line)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"[{key}]"
    return f".{key}" if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else f"[{key!r}]"


def _names(keys: Any) -> str:
    return ", ".join(k if isinstance(k, str) and _PLAIN_KEY.fullmatch(k) else repr(k) for k in keys)


def _lines(node: Any, path: tuple[Any, ...] = (), out: dict[tuple[Any, ...], int] | None = None
           ) -> dict[tuple[Any, ...], int]:
    """The line (1-based) of every key and list item under a YAML node, by path."""
    import yaml

    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                out[path + (key.value,)] = key.start_mark.line + 1
                _lines(value, path + (key.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _lines(item, path + (i,), out)
    return out


def read_document(doc: Any, where: str) -> Resource:
    """One document already parsed (a snapshot's, as JSON), checked as `parse_documents` checks each."""
    return _resource(doc, where)


def _resource(doc: Any, where: str, lines: dict[tuple[Any, ...], int] | None = None, source: str = "") -> Resource:
    if not isinstance(doc, dict):
        raise ResourceError(f"{where}: expected a mapping with apiVersion, kind, metadata and spec")
    if "kind" not in doc and set(doc) == {"services"}:  # mesh.yaml as people have it
        doc = {"apiVersion": _OURS[0], "kind": "Mesh", "metadata": {"name": "mesh"}, "spec": doc}
    kind = doc.get("kind")
    if kind in CONTROL_PLANE_KINDS:
        how = "meshlens ca rotate" if kind == "TrustBundle" else "meshlens mode set SERVICE enforce --guard"
        raise ResourceError(f"{where}: a {kind} is written by the control plane only ({how}), never applied")
    if kind not in API_VERSIONS:
        raise ResourceError(f"{where}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    version = doc.get("apiVersion")
    if version not in API_VERSIONS[kind]:
        raise ResourceError(f"{where}: {kind} apiVersion must be one of {', '.join(API_VERSIONS[kind])}, "
                            f"not {version!r}")
    unknown = sorted(set(doc) - _TOP, key=str)
    if unknown:
        raise ResourceError(f"{where}: unknown field(s) {_names(unknown)} (expected: apiVersion, kind, metadata, spec)")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ResourceError(f"{where}: metadata.name is required")
    unknown = sorted(set(meta) - _METADATA, key=str)
    if unknown:
        raise ResourceError(f"{where}: unknown field(s) in metadata: {_names(unknown)}")
    name = meta["name"]
    if not _NAME.fullmatch(name):
        raise ResourceError(f"{where}: metadata.name {name!r} must be lowercase letters, digits, '-' and '.'")
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not _NAME.fullmatch(namespace)):
        raise ResourceError(f"{where}: metadata.namespace {namespace!r} must be lowercase letters, digits, '-' and '.'")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ResourceError(f"{where}: spec must be a mapping")
    if kind == "Mesh":
        from meshlens.mesh import MeshError, parse

        if name != "mesh":
            raise ResourceError(f"{where}: a control plane holds one Mesh, named 'mesh', not {name!r}")
        try:
            parse(spec, f"{where}: spec")
        except MeshError as e:
            raise ResourceError(str(e)) from None
    elif kind == "Mode":
        if set(spec) != {"mode"} or spec["mode"] not in MODES:
            raise ResourceError(f"{where}: spec must be {{mode: {' | '.join(MODES)}}}, not {spec!r}")
    if version == _OURS[0]:
        return _checked(Resource(kind, name, doc, source=source or where, lines=lines or {}), "")
    res = Resource(kind, f"{namespace or DEFAULT_NAMESPACE}/{name}", doc, source=source or where, lines=lines or {})
    return _checked(res, namespace or DEFAULT_NAMESPACE)


def _checked(res: Resource, namespace: str) -> Resource:
    """The spec checked by its kind's module; its warnings, each naming the field and line, kept with it."""
    from meshlens.policy.spec import SpecError

    if res.kind in ("VirtualService", "DestinationRule"):
        from meshlens.policy import networking  # here: it imports re2, which only these kinds need

        check = networking.check_virtual_service if res.kind == "VirtualService" else networking.check_destination_rule
    elif res.kind in ("PeerAuthentication", "AuthorizationPolicy"):
        from meshlens.policy import security

        check = (security.check_peer_authentication if res.kind == "PeerAuthentication" else
                 security.check_authorization_policy)
    elif res.kind == "LocalRateLimit":
        from meshlens.policy.ratelimit import check_local_rate_limit as check
    else:
        return res
    try:
        warnings = check(res.doc["spec"], namespace)
    except SpecError as e:
        raise ResourceError(f"{res.at(e.path)}: {e}") from None
    return replace(res, warnings=tuple(f"{res.at(path)}: {text}" for path, text in warnings))


def check_references(resources: list[Resource]) -> dict[tuple[str, str], tuple[str, ...]]:
    """Across a whole set of resources (the stored ones with those applied): subsets routed to exist.
    Refuses with ResourceError; returns more warnings by resource key."""
    from meshlens.policy.networking import check_references as check
    from meshlens.policy.spec import SpecError

    try:
        found = check(resources)
    except SpecError as e:
        raise ResourceError(f"{e.resource.at(e.path)}: {e}") from None
    by_key = {r.key: r for r in resources}
    return {key: tuple(f"{by_key[key].at(path)}: {text}" for path, text in items) for key, items in found.items()}

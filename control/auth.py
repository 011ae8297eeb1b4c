"""Who may ask the control plane what: bearer tokens with a role, read from a YAML file.

    tokens:
      - name: ana              # changes are attributed to this name in the history
        token: "…"             # or token_sha256: the SHA-256 of the token, in hex (no secret on disk)
        role: write            # read: GET everything; write: read + apply, delete, mode set
      - name: web-sidecar
        token_sha256: "9f86…"
        role: sidecar          # its snapshot and its status reports only
        service: web           # … and only for this service

Without a tokens file the control plane serves anyone who reaches it, so it listens on
loopback only; with one, every request but /healthz needs `Authorization: Bearer TOKEN`
(401 without a known one, 403 beyond its role) and may listen on any address. Tokens are
compared as SHA-256 digests in constant time. The file is read again when it changes:
taking a token out revokes it (`Tokens`).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLES", "Token", "TokenError", "Tokens", "load_tokens"]

ROLES = ("read", "write", "sidecar")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A token shorter than this is refused: 128 bits, as a random 32-character hex string has.
MIN_TOKEN_CHARS = 32

log = logging.getLogger("meshlens.control.auth")


class TokenError(ValueError):
    """A tokens file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    service: str | None = None
    """For a sidecar's token: the one service it may ask for."""

    def may(self, action: str, service: str | None = None) -> bool:
        """`action`: read, write, or sidecar (a snapshot or a status report; for `service`, once known)."""
        if self.role == "write":
            return True
        if self.role == "read":
            return action == "read"
        return action == "sidecar" and (service is None or self.service is None or service == self.service)


class Tokens:
    """The tokens of a file, read again when it changes (checked at most every RELOAD_S): a token taken out of it is
    revoked from then on, for every request, a sidecar's polls and certificate requests included. A file changed
    into one that cannot be used is logged and the tokens in force kept."""

    RELOAD_S = 1.0

    def __init__(self, by_digest: dict[bytes, Token], path: str | None = None) -> None:
        self._by_digest = by_digest
        self.path = path
        self._stamp = _stamp(path) if path else None
        self._checked = time.monotonic()

    def __len__(self) -> int:
        return len(self._by_digest)

    def _reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.RELOAD_S:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            fresh = load_tokens(self.path)
        except TokenError as e:
            log.error("the tokens file changed into one that cannot be used; keeping the %d tokens in force: %s",
                      len(self._by_digest), e)
            return
        gone = sorted({t.name for t in self._by_digest.values()} - {t.name for t in fresh._by_digest.values()})
        self._by_digest = fresh._by_digest
        log.warning("tokens file reloaded path=%s tokens=%d revoked=%s", self.path, len(self), ",".join(gone) or "-")

    def find(self, header: str | None) -> Token | None:
        """The token an Authorization header carries, if it is one of ours."""
        self._reload()
        if not header or not header.startswith("Bearer "):
            return None
        digest = hashlib.sha256(header[len("Bearer "):].strip().encode()).digest()
        found = None
        for known, token in self._by_digest.items():  # every digest compared: no early exit to time
            if hmac.compare_digest(known, digest):
                found = token
        return found


def load_tokens(path: str) -> Tokens:
    from meshlens.yamlfile import read_yaml

    doc = read_yaml(path, "tokens file", TokenError)
    if not isinstance(doc, dict) or set(doc) != {"tokens"} or not isinstance(doc["tokens"], list) or not doc["tokens"]:
        raise TokenError(f"{path}: expected a mapping with one key, tokens: a list of name, token, role")
    by_digest: dict[bytes, Token] = {}
    names: set[str] = set()
    for i, item in enumerate(doc["tokens"]):
        where = f"{path}: tokens[{i}]"
        by_digest_entry = _entry(item, where)
        digest, token = by_digest_entry
        if token.name in names:
            raise TokenError(f"{where}: name {token.name!r} is used twice")
        if digest in by_digest:
            raise TokenError(f"{where}: the same token as {by_digest[digest].name!r}")
        names.add(token.name)
        by_digest[digest] = token
    return Tokens(by_digest, path)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _entry(item: Any, where: str) -> tuple[bytes, Token]:
    if not isinstance(item, dict):
        raise TokenError(f"{where}: expected a mapping with name, token (or token_sha256) and role")
    unknown = sorted(set(map(str, item)) - {"name", "token", "token_sha256", "role", "service"})
    if unknown:
        raise TokenError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name, role, service = item.get("name"), item.get("role"), item.get("service")
    if not isinstance(name, str) or not name.strip():
        raise TokenError(f"{where}: name is required")
    if role not in ROLES:
        raise TokenError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
    if service is not None and (role != "sidecar" or not isinstance(service, str)):
        raise TokenError(f"{where}: service is for a sidecar's token only, a service name")
    if ("token" in item) == ("token_sha256" in item):
        raise TokenError(f"{where}: give exactly one of token and token_sha256")
    if "token" in item:
        secret = item["token"]
        if not isinstance(secret, str) or len(secret) < MIN_TOKEN_CHARS:
            raise TokenError(f"{where}: token must be a string of at least {MIN_TOKEN_CHARS} characters "
                             f"(e.g. from `openssl rand -hex 16`)")
        digest = hashlib.sha256(secret.encode()).digest()
    else:
        text = item["token_sha256"]
        if not isinstance(text, str) or not _HEX64.fullmatch(text.lower()):
            raise TokenError(f"{where}: token_sha256 must be 64 hex digits (sha256sum of the token)")
        digest = bytes.fromhex(text)
    return digest, Token(name.strip(), role, service)

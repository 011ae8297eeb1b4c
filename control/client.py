"""The control plane's API from a tool (the CLI): one call per request, errors in one line.

Standard library only (urllib): the CLI imports it without aiohttp.
"""
from __future__ import annotations

import getpass
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["DEFAULT_CONTROL", "ControlClient", "ControlError", "control_url"]

DEFAULT_CONTROL = "http://127.0.0.1:15010"


class ControlError(Exception):
    """The control plane refused (its one-line message) or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def control_url(flag: str | None) -> str:
    """--control, else MESHLENS_CONTROL, else the local control plane."""
    url = flag or os.environ.get("MESHLENS_CONTROL") or DEFAULT_CONTROL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ControlError(f"control plane URL must be http(s)://host:port, got {url!r}")
    return url.rstrip("/")


class ControlClient:
    def __init__(self, url: str, timeout: float = 10.0, token: str | None = None, ca: str | None = None) -> None:
        """`token`: sent as a bearer token (else MESHLENS_TOKEN); `ca`: the PEM file an https control plane's
        certificate is checked against (else MESHLENS_CONTROL_CA, else the system's)."""
        self.url = url
        self.timeout = timeout
        self.token = token or os.environ.get("MESHLENS_TOKEN") or None
        self._tls = None
        if url.startswith("https://"):
            import ssl

            ca = ca or os.environ.get("MESHLENS_CONTROL_CA") or None
            try:
                self._tls = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise ControlError(f"cannot read CA file {ca}: {getattr(e, 'strerror', None) or e}") from None
        try:
            self.user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid
            self.user = f"uid {os.getuid()}"

    def request(self, method: str, path: str, body: bytes | None = None, *, reason: str = "",
                headers: dict[str, str] | None = None, query: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        h = {"X-Meshlens-User": self.user, **(headers or {})}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if reason:
            h["X-Meshlens-Reason"] = urllib.parse.quote(reason)
        req = urllib.request.Request(url, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._tls) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise ControlError(_message(e), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason_ = getattr(e, "reason", e)
            text = getattr(reason_, "strerror", None) or str(reason_)
            raise ControlError(f"cannot reach the control plane at {self.url}: {text} "
                               f"(start one with `meshlens control`, or pass --control URL)") from None
        except ValueError:
            raise ControlError(f"the control plane at {self.url} answered something other than JSON") from None

    def apply(self, files: list[tuple[str, str]], reason: str = "", dry_run: bool = False,
              force: bool = False) -> dict[str, Any]:
        """Store every document of the files given ((source, YAML text) pairs) in one change, or none;
        `dry_run`: only say what would change (each result with its document before and after); `force`: past
        the readiness gate (control/gate.py)."""
        body = json.dumps({"files": [{"source": s, "text": t} for s, t in files]}).encode()
        query = {"dry_run": "true" if dry_run else None, "force": "true" if force else None}
        return self.request("POST", "/v1/apply", body, reason=reason, headers={"Content-Type": "application/json"},
                            query=query if dry_run or force else None)

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return self.request("GET", "/v1/resources", query={"kind": kind})
        return self.request("GET", f"/v1/resources/{urllib.parse.quote(kind)}/{urllib.parse.quote(name)}")

    def delete(self, kind: str, name: str, reason: str = "") -> dict[str, Any]:
        return self.request("DELETE", f"/v1/resources/{urllib.parse.quote(kind)}/{urllib.parse.quote(name)}",
                            reason=reason)

    def set_mode(self, service: str, mode: str, reason: str, force: bool = False,
                 guard: dict[str, Any] | None = None) -> dict[str, Any]:
        """`guard`: its settings (control/guard.py; {} for the defaults): enforce, switched back to dry-run by the
        control plane if it makes the calls worse."""
        body = {"mode": mode, "reason": reason, **({"guard": guard} if guard is not None else {})}
        return self.request("PUT", f"/v1/modes/{urllib.parse.quote(service)}", json.dumps(body).encode(),
                            headers={"Content-Type": "application/json"}, query={"force": "true"} if force else None)

    def guards(self, service: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/guards" + (f"/{urllib.parse.quote(service)}" if service else ""))

    def modes(self, service: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/modes" + (f"/{urllib.parse.quote(service)}" if service else ""))

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def history(self, kind: str | None = None, name: str | None = None, limit: int = 100,
                service: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/history", query={"kind": kind, "name": name, "service": service, "limit": limit})


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"the control plane answered {e.code} {e.reason}"

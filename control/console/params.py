"""The console's query parameters, checked: each bad one is a BadParameter in one line (answered 400).

The page puts what the user typed (a window, a filter) straight into these, so every message names the
parameter, quotes what was given (cut short, escaped: one line whatever it holds) and says what would work.
"""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal, Mapping

from meshlens.analysis.window import Window, parse_duration

__all__ = ["DEFAULT_WINDOW", "MAX_TAIL_ROWS", "MAX_WINDOW", "STATUS_CLASSES", "BadParameter", "after", "limit",
           "service", "status_class", "window"]

DEFAULT_WINDOW = "15m"  # Kiali's default graph window is the last minute; a quarter hour holds enough calls to judge
# The longest window a page may ask for: what retention keeps by default is weeks, and a month of calls is already a
# long scan for a page that is reloaded as one clicks around.
MAX_WINDOW = timedelta(days=31)
MAX_TAIL_ROWS = 500  # one answer of the live tail: a screenful many times over, and small JSON
StatusClass = Literal["", "2xx", "3xx", "4xx", "5xx", "error"]
STATUS_CLASSES: tuple[str, ...] = ("2xx", "3xx", "4xx", "5xx", "error")
# A service's name as the control plane stores it (meshlens/policy/resources.py: lowercase letters, digits, '-', '.'),
# or as the calls name a caller without one (an address: digits, '.', ':', '[', ']').
_SERVICE = re.compile(r"[a-z0-9\[][a-z0-9.:\[\]-]{0,252}")
_NANOS = re.compile(r"\d{1,19}")


class BadParameter(ValueError):
    """A parameter the console cannot use; one line naming it."""


def _shown(value: str) -> str:
    return repr(value[:60] + ("…" if len(value) > 60 else ""))


def window(query: Mapping[str, str]) -> tuple[str, Window]:
    """`window=15m`: the last 15 minutes (a duration: 90s, 15m, 1h, 7d); the text and the Window it names."""
    text = query.get("window", DEFAULT_WINDOW).strip() or DEFAULT_WINDOW
    try:
        span = parse_duration(text)
    except ValueError:
        raise BadParameter(f"window must be a duration such as 90s, 15m, 1h or 7d, not {_shown(text)}") from None
    if not timedelta(seconds=1) <= span <= MAX_WINDOW:
        raise BadParameter(f"window must be 1s to {MAX_WINDOW.days}d, not {_shown(text)}")
    return text, Window.last(span)


def service(name: str) -> str:
    """A service in a path or a filter: as the mesh names it, or the address the calls name an unmeshed caller by."""
    if not _SERVICE.fullmatch(name):
        raise BadParameter(f"{_shown(name)} is not a service name (lowercase letters, digits, '-' and '.')")
    return name


def status_class(query: Mapping[str, str]) -> StatusClass:
    """`status=` 2xx, 3xx, 4xx, 5xx or error (no response at all, or an error class); empty: every call."""
    value = query.get("status", "")
    if value and value not in STATUS_CLASSES:
        raise BadParameter(f"status must be one of {', '.join(STATUS_CLASSES)} (or empty for all), not {_shown(value)}")
    return value  # type: ignore[return-value]  # checked just above


def after(query: Mapping[str, str]) -> int:
    """`after=` the live tail's cursor: a call's time in nanoseconds since the epoch (0: from the start)."""
    value = query.get("after", "0")
    if not _NANOS.fullmatch(value) or int(value) >= 2 ** 63:
        raise BadParameter(f"after must be a time in nanoseconds since the epoch (the cursor an answer gave), "
                           f"not {_shown(value)}")
    return int(value)


def limit(query: Mapping[str, str], default: int = 100) -> int:
    value = query.get("limit", str(default))
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_TAIL_ROWS:
        raise BadParameter(f"limit must be a whole number from 1 to {MAX_TAIL_ROWS}, not {_shown(value)}")
    return int(value)

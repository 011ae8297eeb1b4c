"""The one exception the CLI turns into a one-line message and exit code 2, and the wordings it shares."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: printed as one line, exit code 2."""


def bad_store_url(url: str, error: ValueError, what: str = "store URL") -> UserError:
    """A store URL (`what`: --store's, or a flag's) that cannot be parsed: our own message as it is,
    the URL parser's with the URL, its password hidden."""
    from meshlens.collector.stores import StoreURLError, redact

    if isinstance(error, StoreURLError):
        return UserError(str(error))
    return UserError(f"invalid {what} {redact(url)!r}: {error}")


def bad_collector_url(url: str, error: ValueError) -> UserError:
    """A --collector URL the recorder refused: its own message names the form; the URL parser's does not."""
    text = str(error)
    return UserError(text if text.startswith("collector URL") else f"invalid collector URL {url!r}: {text}")

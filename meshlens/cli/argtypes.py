"""argparse value types shared by the subcommands: one wording for every port and duration error."""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["port", "positive"]

_PORT_HINTS = {1: "", 0: " (0 = any free port)", -1: " (0 = any free port, -1 = off)"}


def port(lowest: int = 0) -> Callable[[str], int]:
    """A TCP port from `lowest` to 65535: 1 for a real port, 0 to allow "any free port", -1 to also allow "off"."""
    hint = _PORT_HINTS[lowest]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"port must be {lowest}..65535{hint}, got {value}")
        return value

    return parse


def positive(unit: str) -> Callable[[str], float]:
    """A number above 0, in `unit` (named in the error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0 {unit}, got {text}")
        return value

    return parse

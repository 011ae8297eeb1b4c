"""What the notebooks share: the store named by MESHLENS_STORE, sections that say "not enough data", the graph drawing.

A notebook must run top to bottom on any store, an empty one included: each
section runs inside `Notebook.section(title)`, which turns NoData (nothing in
the window, or an empty result where the section needs rows) into one
"not enough data" line instead of a traceback. Real errors still raise.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Sized, TypeVar

import pandas as pd

from meshlens.collector.stores import Store, connect, reader_store_url, redact

from meshlens.analysis.graph import call_levels
from meshlens.analysis.scope import NoData, Scope, open_scope
from meshlens.analysis.window import Window, parse_duration

T = TypeVar("T", bound=Sized)

STORE_ENV = "MESHLENS_STORE"
WINDOW_ENV = "MESHLENS_WINDOW"   # e.g. 1h: only the last hour; unset: every recorded call


def need(rows: T | None, what: str) -> T:
    """`rows` (a DataFrame or a list), or NoData naming what is missing when there are none."""
    if rows is None or len(rows) == 0:
        raise NoData(f"no {what} in the window")
    return rows


@dataclass
class Notebook:
    """The store, the window and the scope of one notebook run; `scope` raises NoData when there is nothing."""

    store: Store
    window: Window
    _scope: Scope | None = None
    _why: str = ""

    @classmethod
    def from_env(cls) -> Notebook:
        """Connect to MESHLENS_STORE (an http:// query URL or any store URL) and open the scope once."""
        url = os.environ.get(STORE_ENV) or reader_store_url()
        store = connect(url)
        store.use_database()
        span = os.environ.get(WINDOW_ENV)
        window = Window.last(parse_duration(span)) if span else Window()
        nb = cls(store, window)
        try:
            nb._scope = open_scope(store, window)
        except NoData as e:
            nb._why = str(e)
        print(f"store {redact(url)}, window {window.describe()}: "
              + (f"{nb._scope.n:,} calls" if nb._scope else f"not enough data: {nb._why}"))
        return nb

    @property
    def scope(self) -> Scope:
        if self._scope is None:
            raise NoData(self._why)
        return self._scope

    @contextlib.contextmanager
    def section(self, title: str) -> Iterator[None]:
        """Run a section; NoData inside it prints "not enough data" and the notebook goes on."""
        try:
            yield
        except NoData as e:
            print(f"{title}: not enough data — {e}")


def draw_service_graph(edges: pd.DataFrame, ax=None, error_alert: float = 0.01):
    """Services as nodes (callers left, callees right, by call depth), edges labelled with rate and error rate.

    `edges` is analysis.graph.edges(): caller, callee, rate_per_s, error_rate. Edges failing more than
    `error_alert` are drawn red.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(11, 6))
    level = call_levels(zip(edges["caller"], edges["callee"]))
    layers: dict[int, list[str]] = {}
    for svc in sorted(level):
        layers.setdefault(level[svc], []).append(svc)
    top = max(layers, default=0)
    pos = {svc: (x, (i + 1) / (len(names) + 1)) for x, names in layers.items() for i, svc in enumerate(names)}
    for r in edges.itertuples():
        if r.caller == r.callee:
            continue
        (x0, y0), (x1, y1) = pos[r.caller], pos[r.callee]
        colour = "tab:red" if r.error_rate > error_alert else "tab:gray"
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "color": colour, "shrinkA": 18, "shrinkB": 18, "lw": 1.5})
        # Labels sit 60% along the arrow: edges leaving one caller fan out there, so they overlap less.
        ax.text(x0 + 0.6 * (x1 - x0), y0 + 0.6 * (y1 - y0), f"{r.rate_per_s:.2g}/s\n{r.error_rate:.1%} err",
                fontsize=8,
                ha="center", va="center", color=colour, bbox={"fc": "white", "ec": "none", "alpha": 0.8})
    for s, (x, y) in pos.items():
        ax.text(x, y, s, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": "#dde8f5", "ec": "#4a6fa5"})
    ax.set_xlim(-0.4, top + 0.4)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title("service graph (rate, error rate per caller → callee)")
    return ax

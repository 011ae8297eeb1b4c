"""Generated traffic with known ground truth, written straight into a store.

Every figure a test checks is fixed here (fixed seeds), next to the traffic that carries it.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

from meshlens.analysis.window import Window
from meshlens.collector.columns import to_table
from meshlens.collector.schema import Layout, migrate
from meshlens.collector.stores import Store

T0 = (datetime.now(timezone.utc) - timedelta(hours=1)).replace(second=0, microsecond=0)
SPAN_S = 1800
WINDOW = Window(T0, T0 + timedelta(seconds=SPAN_S))

HEALTHY_TAIL_S = 0.120      # frontend → catalog: no successful call is slower (clipped lognormal)
CATALOG_N = 20_000
CATALOG_TRANSIENT = 0.03     # independent 503s
BAD_INSTANCE = "10.0.2.3:8080"
BAD_RATE = 0.30
OUTAGE = (600, 960)          # frontend → cart fails every call in these seconds: persistent
UNMESHED = {"cron", "legacy-batch", "reports"}
THIN_N = 50                  # frontend → search
ACCOUNTS_N = 5000           # frontend → accounts, also seen by the tap and spans that cannot name the caller
UNNAMED_ADDR = "10.1.0.77"
REPORTS_N = 200             # reports → accounts: no sidecar, its own spans; accounts' sidecar sees it unnamed
THIN_MTLS_N = 40             # cron → audit: plaintext from an unmeshed caller, too few calls for a verdict
NAMES = [f"user{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x" for i in range(200)]


class Traffic:
    def __init__(self, seed: int = 5) -> None:
        self.rng = np.random.default_rng(seed)
        self.cols: dict[str, list] = {}
        self.spans = 1  # next trace / span id

    def add(self, n: int, src: str, dst: str, method: str, paths, ok_ms: tuple[float, float, float], *,
            fail: np.ndarray | None = None, fail_status: int = 503, fail_error: str = "", tls: bool = True,
            observer: str = "client", instances: list[str] | None = None, attrs: dict[str, str] | None = None,
            times: np.ndarray | None = None, bad: tuple[str, float] | None = None, traced: bool = False) -> dict:
        rng = self.rng
        t = np.sort(times if times is not None else rng.uniform(0, SPAN_S, n))
        median, sigma, clip = ok_ms
        dur = np.minimum(rng.lognormal(np.log(median), sigma, n), clip) / 1000.0
        inst = rng.choice(instances or ["10.9.9.9:80"], n)
        fail = np.zeros(n, bool) if fail is None else fail
        if bad is not None:
            fail = fail | ((inst == bad[0]) & (rng.uniform(size=n) < bad[1]))
        dur = np.where(fail, 0.002, dur)
        paths = [paths(i) for i in range(n)] if callable(paths) else [paths] * n
        cols = {
            "time": [int(T0.timestamp() * 1e9 + x * 1e9) for x in t], "duration_ns": (dur * 1e9).astype(np.uint64),
            "observer": [observer] * n, "src_service": [src] * n, "dst_service": [dst] * n,
            "src_addr": [f"10.1.0.{abs(hash(src)) % 250}"] * n,
            "dst_addr": [i.split(":")[0] for i in inst], "dst_port": [int(i.split(":")[1]) for i in inst],
            "protocol": ["http/1.1"] * n, "method": [method] * n, "path": paths,
            "status": np.where(fail & (fail_error == ""), fail_status, np.where(fail, 0, 200)).astype(np.uint16),
            "error": np.where(fail, fail_error, "").tolist(), "tls": [tls] * n,
            "attributes": [list((attrs or {}).items())] * n,
            "trace_id": [f"{self.spans + i:032x}" for i in range(n)] if traced else [""] * n,
            "span_id": [f"{self.spans + i:016x}" for i in range(n)] if traced else [""] * n,
            "parent_span_id": [""] * n,
        }
        self.spans += n if traced else 0
        for k, v in cols.items():
            self.cols.setdefault(k, []).extend(list(v))
        return cols

    def write(self, store: Store) -> int:
        table = to_table("calls", self.cols)
        store.insert("meshlens.calls", table, "analysis-tests")
        return table.num_rows


def generate(store: Store) -> int:
    """Write the scenario; returns the number of rows."""
    migrate(store, Layout())
    store.use_database()
    tr = Traffic()
    rng = tr.rng
    cat = [f"10.0.1.{i}:8080" for i in range(1, 5)]
    c = tr.add(CATALOG_N, "frontend", "catalog", "GET", lambda i: f"/products/{rng.integers(1, 10**6)}",
               (20, 0.5, HEALTHY_TAIL_S * 1000), fail=rng.uniform(size=CATALOG_N) < CATALOG_TRANSIENT,
               instances=cat)
    # The catalog's own sidecar sees the same exchanges: a second observer that must not double count.
    server_copy = {k: list(v) for k, v in c.items()}
    server_copy["observer"] = ["server"] * CATALOG_N
    for k, v in server_copy.items():
        tr.cols[k].extend(v)
    tr.add(15_000, "catalog", "inventory", "GET", lambda i: f"/stock/{rng.integers(16**9, 16**10):010x}",
           (10, 0.4, 80), instances=[f"10.0.2.{i}:8080" for i in range(1, 5)], bad=(BAD_INSTANCE, BAD_RATE),
           fail=rng.uniform(size=15_000) < 0.003)
    cart_t = rng.uniform(0, SPAN_S, 8000)
    tr.add(8000, "frontend", "cart", "GET", lambda i: f"/cart/{_uuid(rng)}", (15, 0.5, 100), times=cart_t,
           fail=(np.sort(cart_t) >= OUTAGE[0]) & (np.sort(cart_t) < OUTAGE[1]), instances=["10.0.3.1:8080"])
    tr.add(4000, "frontend", "checkout", "POST", "/orders", (50, 0.4, 300),
           fail=rng.uniform(size=4000) < 0.04, fail_error="reset", instances=["10.0.5.1:8080"])
    tr.add(4000, "checkout", "payments", "POST", "/charge", (30, 0.4, 200), fail=rng.uniform(size=4000) < 0.03,
           fail_error="reset", attrs={"idempotency-key": "k"}, instances=["10.0.4.1:8080", "10.0.4.2:8080"])
    tr.add(300, "frontend", "notifications", "GET", "/events/stream", (60_000, 0.3, 120_000), tls=False,
           instances=["10.0.6.1:8080"])
    fa = tr.add(ACCOUNTS_N, "frontend", "accounts", "GET", lambda i: f"/users/{NAMES[rng.integers(0, 200)]}",
                (8, 0.3, 50), instances=["10.0.7.1:8080"])
    tr.add(500, "cron", "accounts", "GET", lambda i: f"/users/{NAMES[rng.integers(0, 200)]}", (8, 0.3, 50),
           tls=False, observer="server", instances=["10.0.7.1:8080"])
    tr.add(300, "legacy-batch", "payments", "POST", "/charge", (30, 0.4, 200), tls=False, observer="wire",
           instances=["10.0.4.1:8080"])
    tr.add(THIN_N, "frontend", "search", "GET", "/q", (5, 0.3, 30), instances=["10.0.8.1:8080"])
    tr.add(THIN_MTLS_N, "cron", "audit", "POST", "/audit", (5, 0.3, 30), tls=False, observer="server",
           instances=["10.0.9.1:8080"])
    # reports has no sidecar but is instrumented: its client spans name it; accounts' sidecar sees the same calls
    # from an address only (a child of the span: same trace, parent = the span). Counted once, as reports.
    rep = tr.add(REPORTS_N, "reports", "accounts", "GET", "/users/export", (20, 0.3, 100), tls=False,
                 observer="otlp", instances=["10.0.7.1:8080"], traced=True)
    copy = {k: list(v) for k, v in rep.items()}
    copy |= {"observer": ["server"] * REPORTS_N, "src_service": [""] * REPORTS_N, "src_addr": ["10.1.0.88"] * REPORTS_N,
             "parent_span_id": rep["span_id"], "span_id": [f"{i:016x}" for i in range(10**6, 10**6 + REPORTS_N)]}
    for k, v in copy.items():
        tr.cols[k].extend(v)
    # The tap and accounts' own spans see frontend → accounts as well, without knowing the caller (an address
    # with an ephemeral port; no peer at all). accounts' sidecar saw these calls (cron's), so they must not count.
    for observer, name in (("wire", lambda i: f"{UNNAMED_ADDR}:{40000 + i}"), ("otlp", lambda i: "")):
        copy = {k: list(v) for k, v in fa.items()}
        copy["observer"] = [observer] * ACCOUNTS_N
        copy["src_service"] = [name(i) for i in range(ACCOUNTS_N)]
        copy["src_addr"] = [UNNAMED_ADDR] * ACCOUNTS_N
        for k, v in copy.items():
            tr.cols[k].extend(v)
    return tr.write(store)


def _uuid(rng: np.random.Generator) -> str:
    h = f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

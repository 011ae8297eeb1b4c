"""The live tail: the newest recorded calls after a cursor, filtered by service and status class (blocking).

Every row as its observer recorded it (a call seen by both sidecars is two rows, each saying who saw it): a tail is
for watching traffic go by, not for counting it, which the map does with one observer per edge. An answer holds the
newest `limit` calls after the cursor, newest first, and the cursor for the next ask (the newest time it held, in
nanoseconds, as text: JavaScript's numbers cannot hold it). Rows reach the store in batches, a sidecar's a second or
so after its calls, so a page asks again from a little before its cursor and drops the rows it already shows.
"""
from __future__ import annotations

from typing import Any

from meshlens.analysis.window import CALLER_SQL, quote
from meshlens.collector.stores import Store

__all__ = ["HORIZON_S", "STATUS_SQL", "tail"]

HORIZON_S = 15 * 60  # never further back than this: a tail is the present, and the scan stays in today's partition
STATUS_SQL = {
    "2xx": "(status BETWEEN 200 AND 299 AND error = '')",
    "3xx": "(status BETWEEN 300 AND 399 AND error = '')",
    "4xx": "(status BETWEEN 400 AND 499 AND error = '')",
    "5xx": "status >= 500",
    "error": "(error != '' OR status = 0)",  # no response, or one cut short: the failure class says which
}
_COLUMNS = ("time_ns", "observer", "observer_id", "caller", "callee", "method", "path", "status", "duration_ms",
            "mode", "action", "response_flags", "error")


def tail(store: Store, after_ns: int, service: str, status: str, limit: int) -> dict[str, Any]:
    """Calls after `after_ns` (and within HORIZON_S of now), to or from `service` ('' any), of `status` ('' any)."""
    where = [f"time > greatest(fromUnixTimestamp64Nano(toInt64({int(after_ns)})), "
             f"now64(9) - toIntervalSecond({HORIZON_S}))"]
    if service:
        where.append(f"(dst_service = {quote(service)} OR src_service = {quote(service)})")
    if status:
        where.append(STATUS_SQL[status])
    sql = f"""SELECT toString(toUnixTimestamp64Nano(time)), toString(observer), toString(observer_id), {CALLER_SQL},
       toString(dst_service), toString(method), path, status, duration_ns / 1e6, toString(mode), toString(action),
       toString(response_flags), toString(error)
FROM calls WHERE {' AND '.join(where)} ORDER BY time DESC LIMIT {int(limit)}"""
    calls = [dict(zip(_COLUMNS, row)) for row in store.query_rows(sql)]
    for c in calls:
        c["status"], c["duration_ms"] = int(c["status"]), round(float(c["duration_ms"]), 3)
    return {"calls": calls, "cursor": calls[0]["time_ns"] if calls else str(after_ns)}

"""Istio-style request and TCP metrics (per process), rendered in the Prometheus text format.

Names follow Istio's standard set under a `meshlens_` prefix: requests_total,
request_duration_milliseconds (histogram), request_bytes and response_bytes (sums),
labelled by reporter, source/destination service and response code; for connections
passed through as tunnels (tcp, tls, h2), tcp_connections_opened_total and
tcp_connections_closed_total, tcp_received_bytes_total (client to destination) and
tcp_sent_bytes_total (destination to client), added when the connection closes.
Updating is a few dict operations per exchange; rendering happens only when scraped.
"""
from __future__ import annotations

from bisect import bisect_left

__all__ = ["DURATION_BUCKETS_MS", "Metrics"]

# Istio's default request_duration_milliseconds buckets.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
                       1800000, 3600000)

Key = tuple[str, str, str, int, str]  # reporter, source, destination, code, flags
TcpKey = tuple[str, str, str]  # reporter, source, destination


# One request series: [requests, duration sum ms, request bytes, response bytes, *bucket counts].
_COUNT, _SUM, _REQUEST_BYTES, _RESPONSE_BYTES, _BUCKETS = 0, 1, 2, 3, 4


class Metrics:
    def __init__(self) -> None:
        self.series: dict[Key, list] = {}
        """Request series by label set: one lookup an exchange (observe runs once per request)."""
        self.tcp_opened_total: dict[TcpKey, int] = {}
        # + response_flags: Envoy's flags (UF, UC, ...), "-" when none, as Istio's metrics carry them
        self.tcp_closed_total: dict[tuple[str, str, str, str], int] = {}
        self.tcp_received: dict[TcpKey, int] = {}
        self.tcp_sent: dict[TcpKey, int] = {}

    def observe(self, key: Key, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0, 0.0, 0, 0] + [0] * (len(DURATION_BUCKETS_MS) + 1)
        s[0] += 1  # literal positions (_COUNT, ...): a global lookup each would cost more than the rest
        s[1] += duration_ms
        s[2] += request_bytes
        s[3] += response_bytes
        s[4 + bisect_left(DURATION_BUCKETS_MS, duration_ms)] += 1

    def tcp_opened(self, key: TcpKey) -> None:
        self.tcp_opened_total[key] = self.tcp_opened_total.get(key, 0) + 1

    def tcp_closed(self, key: TcpKey, flags: str, received: int, sent: int) -> None:
        """A tunnel ended: `received` bytes came from the client, `sent` went back to it."""
        closed = (*key, flags)
        self.tcp_closed_total[closed] = self.tcp_closed_total.get(closed, 0) + 1
        self.tcp_received[key] = self.tcp_received.get(key, 0) + received
        self.tcp_sent[key] = self.tcp_sent.get(key, 0) + sent

    def render(self, gauges: dict[str, float]) -> str:
        out: list[str] = []

        def labels(k: Key, extra: str = "") -> str:
            reporter, src, dst, code, flags = k
            return (f'{{reporter="{reporter}",source_workload="{_esc(src)}",destination_service="{_esc(dst)}",'
                    f'response_code="{code}",response_flags="{flags}"{extra}}}')

        out += ["# HELP meshlens_requests_total Requests handled by this sidecar.", "# TYPE meshlens_requests_total counter"]
        out += [f"meshlens_requests_total{labels(k)} {s[_COUNT]}" for k, s in self.series.items()]
        out += ["# HELP meshlens_request_duration_milliseconds First request byte to last response byte.",
                "# TYPE meshlens_request_duration_milliseconds histogram"]
        for k, s in self.series.items():
            counts = s[_BUCKETS:]
            acc = 0
            for le, c in zip(DURATION_BUCKETS_MS, counts):
                acc += c
                bucket = labels(k, f',le="{le}"')
                out.append(f"meshlens_request_duration_milliseconds_bucket{bucket} {acc}")
            bucket = labels(k, ',le="+Inf"')
            out.append(f"meshlens_request_duration_milliseconds_bucket{bucket} {acc + counts[-1]}")
            out.append(f"meshlens_request_duration_milliseconds_sum{labels(k)} {s[_SUM]:.3f}")
            out.append(f"meshlens_request_duration_milliseconds_count{labels(k)} {s[_COUNT]}")
        for name, at in (("request_bytes", _REQUEST_BYTES), ("response_bytes", _RESPONSE_BYTES)):
            out += [f"# HELP meshlens_{name}_total Body bytes ({name.split('_')[0]}).", f"# TYPE meshlens_{name}_total counter"]
            out += [f"meshlens_{name}_total{labels(k)} {s[at]}" for k, s in self.series.items()]
        out += _tcp_lines(self)
        typed: set[str] = set()
        for name, value in gauges.items():  # a name may carry labels: recorder_dropped_total{reason="x"}
            base = name.split("{", 1)[0]
            if base not in typed:
                typed.add(base)
                out.append(f"# TYPE meshlens_{base} {'counter' if base.endswith('_total') else 'gauge'}")
            out.append(f"meshlens_{name} {value:g}")
        return "\n".join(out) + "\n"


def _tcp_lines(m: Metrics) -> list[str]:
    def labels(k: tuple[str, ...]) -> str:
        text = f'reporter="{k[0]}",source_workload="{_esc(k[1])}",destination_service="{_esc(k[2])}"'
        return "{" + text + (f',response_flags="{_esc(k[3])}"' if len(k) > 3 else "") + "}"

    out: list[str] = []
    for name, help_text, table in (
            ("tcp_connections_opened_total", "Connections passed through as tunnels (tcp, tls, h2).", m.tcp_opened_total),
            ("tcp_connections_closed_total", "Tunnelled connections closed, by error.", m.tcp_closed_total),
            ("tcp_received_bytes_total", "Bytes received from the client of a tunnel.", m.tcp_received),
            ("tcp_sent_bytes_total", "Bytes sent to the client of a tunnel.", m.tcp_sent)):
        if table:
            out += [f"# HELP meshlens_{name} {help_text}", f"# TYPE meshlens_{name} counter"]
            out += [f"meshlens_{name}{labels(k)} {v}" for k, v in table.items()]
    return out


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')

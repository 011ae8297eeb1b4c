"""The collector's ingest HTTP API: OTLP/HTTP traces, call batches, health and metrics.

    POST /v1/traces   OTLP/HTTP, protobuf or JSON, optionally gzip  (port 4318)
    POST /v1/calls    call batches from sidecars and taps (collector/batch_format.py)
    POST /v1/changes  the control plane's changes, into mesh_changes (collector/changes.py)
    GET  /healthz     liveness and spool state
    GET  /metrics     Prometheus

Answers follow the OTLP/HTTP specification: the response has the request's
content type; 400 carries a google.rpc.Status with the decoder's message;
429/503 carry Retry-After; spans refused one by one are reported in
partial_success and the rest are kept. /v1/calls answers JSON in the same
spirit: {"accepted": calls, "rows": rows spooled}, plus "duplicate": true (and
nothing spooled) for a batch whose id was accepted before; {"error": ...} else.
/v1/changes too: {"accepted": changes, "duplicates": those it had already}, once
every change is in the spool (a change it has is not spooled again); a body with
one change wrong is refused whole, 400 naming it.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable

from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshlens.collector import batch_format
from meshlens.collector.changes import change_id, decode as decode_changes
from meshlens.collector.columns import to_table
from meshlens.collector.config import MAX_BODY_BYTES
from meshlens.collector.ingest import Ingest, Overloaded
from meshlens.collector.otlp import OTLPDecodeError, decode_traces
from meshlens.collector.spans import calls_to_spans


_PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")
_JSON_TYPES = ("application/json",)
_CALL_TYPES = (batch_format.CONTENT_TYPE, "application/json")

# google.rpc.Code values used in Status bodies.
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _UNAVAILABLE = 3, 8, 14


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_ingest_app(ingest: Ingest, max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    metrics = ingest.metrics

    async def read_body(request: web.Request) -> bytes:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(413, f"body larger than {max_body_bytes} bytes") from None
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        if encoding == "gzip":
            return _gunzip(body, max_body_bytes)
        if encoding not in ("identity", ""):
            raise BadRequest(415, f"unsupported Content-Encoding {encoding!r}: use gzip or none")
        return body

    def counted(endpoint: str, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            resp = await handler(request)
            metrics.requests.labels(endpoint, str(resp.status)).inc()
            return resp
        return wrapped

    async def traces(request: web.Request) -> web.Response:
        ctype = request.content_type.lower()
        kind = "protobuf" if ctype in _PROTOBUF_TYPES else "json" if ctype in _JSON_TYPES else None
        if kind is None:
            metrics.rejected.labels("unsupported_media_type").inc()
            return web.Response(status=415, text=f"unsupported Content-Type {ctype!r}: use "
                                "application/x-protobuf or application/json\n")
        try:
            body = await read_body(request)
            decoded = decode_traces(body, kind)
            tables = {}
            if decoded.accepted:
                tables["otel_traces"] = to_table("otel_traces", decoded.traces)
                if decoded.calls:
                    tables["calls"] = to_table("calls", decoded.calls)
                ingest.submit(tables, "otlp_http")
        except BadRequest as e:
            metrics.rejected.labels("bad_request" if e.status == 400 else str(e.status)).inc()
            return _status_response(kind, e.status, _INVALID_ARGUMENT, str(e))
        except (OTLPDecodeError, ValueError) as e:
            metrics.rejected.labels("bad_request").inc()
            return _status_response(kind, 400, _INVALID_ARGUMENT, str(e))
        except Overloaded as e:
            code = _RESOURCE_EXHAUSTED if e.status == 429 else _UNAVAILABLE
            return _status_response(kind, e.status, code, str(e), {"Retry-After": str(e.retry_after)})
        if decoded.rejected:
            metrics.rejected_spans.inc(decoded.rejected)
        reply = trace_service_pb2.ExportTraceServiceResponse()
        if decoded.rejected:
            reply.partial_success.rejected_spans = decoded.rejected
            reply.partial_success.error_message = decoded.error
        return _message_response(kind, 200, reply)

    async def calls(request: web.Request) -> web.Response:
        if request.content_type.lower() not in _CALL_TYPES:
            metrics.rejected.labels("unsupported_media_type").inc()
            return web.json_response({"error": f"unsupported Content-Type {request.content_type!r}: "
                                      f"use {batch_format.CONTENT_TYPE}"}, status=415)
        try:
            batch = batch_format.decode(await read_body(request))
            table = to_table("calls", batch.columns)
            tables = {"calls": table}
            spans = calls_to_spans(batch.columns)
            if spans and spans.get("TraceId"):
                tables["otel_traces"] = to_table("otel_traces", spans)
            accepted = ingest.submit(tables, "calls", batch.id) if table.num_rows else 0
        except BadRequest as e:
            metrics.rejected.labels("bad_request" if e.status == 400 else str(e.status)).inc()
            return web.json_response({"error": str(e)}, status=e.status)
        except ValueError as e:
            metrics.rejected.labels("bad_request").inc()
            return web.json_response({"error": str(e)}, status=400)
        except Overloaded as e:
            return web.json_response({"error": str(e)}, status=e.status,
                                     headers={"Retry-After": str(e.retry_after)})
        if accepted is None:  # a resend of a batch we have: the producer may forget it
            return web.json_response({"accepted": table.num_rows, "rows": 0, "duplicate": True})
        return web.json_response({"accepted": table.num_rows, "rows": accepted})

    async def changes(request: web.Request) -> web.Response:
        if request.content_type.lower() not in _JSON_TYPES:
            metrics.rejected.labels("unsupported_media_type").inc()
            return web.json_response({"error": f"unsupported Content-Type {request.content_type!r}: "
                                      "use application/json"}, status=415)
        try:
            rows = decode_changes(await read_body(request))
            # All built before any is spooled: a body is refused whole, or every change is taken.
            tables = [(change_id(r["revision"], r["time"], r["kind"], r["name"]),
                       to_table("mesh_changes", {k: [v] for k, v in r.items()})) for r in rows]
            # One spool frame a change, under its id: the same change from another replica, or
            # resent, is answered and not stored again, whatever it was batched with.
            duplicates = sum(ingest.submit({"mesh_changes": table}, "changes", cid) is None for cid, table in tables)
        except BadRequest as e:
            metrics.rejected.labels("bad_request" if e.status == 400 else str(e.status)).inc()
            return web.json_response({"error": str(e)}, status=e.status)
        except ValueError as e:  # ChangeFormatError, or a value Arrow would not take
            metrics.rejected.labels("bad_request").inc()
            return web.json_response({"error": str(e)}, status=400)
        except Overloaded as e:  # what was spooled before stays; the resend finds it
            return web.json_response({"error": str(e)}, status=e.status,
                                     headers={"Retry-After": str(e.retry_after)})
        return web.json_response({"accepted": len(rows), "duplicates": duplicates})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok" if ingest.store_up else "degraded",
            "store_up": ingest.store_up,
            "spool_bytes": ingest.spool.depth_bytes,
        })

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/v1/traces", counted("traces", traces))
    app.router.add_post("/v1/calls", counted("calls", calls))
    app.router.add_post("/v1/changes", counted("changes", changes))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    return app


def _gunzip(body: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit)
    except zlib.error as e:
        raise BadRequest(400, f"invalid gzip body: {e}") from None
    if d.unconsumed_tail:
        raise BadRequest(413, f"body larger than {limit} bytes once decompressed")
    if not d.eof:
        raise BadRequest(400, "invalid gzip body: truncated")
    return out


def _message_response(kind: str, status: int, message: Any, headers: dict[str, str] | None = None) -> web.Response:
    if kind == "json":
        body = json_format.MessageToJson(message, indent=None).encode()
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)
    return web.Response(status=status, body=message.SerializeToString(),
                        content_type="application/x-protobuf", headers=headers)


def _status_response(kind: str, status: int, code: int, message: str,
                     headers: dict[str, str] | None = None) -> web.Response:
    return _message_response(kind, status, status_pb2.Status(code=code, message=message), headers)

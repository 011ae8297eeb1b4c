"""OTLP/gRPC on 4317: the same decoding and spool as OTLP/HTTP, over grpcio.

The Export method is registered by hand with an identity request deserializer:
the request arrives as bytes and goes through the same partial protobuf parse
as OTLP/HTTP, instead of a full parse into messages and a re-serialisation.
"""
from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshlens.collector.columns import to_table
from meshlens.collector.config import MAX_BODY_BYTES
from meshlens.collector.ingest import Ingest, Overloaded
from meshlens.collector.otlp import decode_traces

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def _export_handler(ingest: Ingest):  # type: ignore[no-untyped-def]
    metrics = ingest.metrics

    def export(body: bytes, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            decoded = decode_traces(body, "protobuf")
            if decoded.accepted:
                tables = {"otel_traces": to_table("otel_traces", decoded.traces)}
                if decoded.calls:
                    tables["calls"] = to_table("calls", decoded.calls)
                ingest.submit(tables, "otlp_grpc")
        except ValueError as e:
            metrics.requests.labels("grpc", "invalid_argument").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Overloaded as e:
            # UNAVAILABLE is the code OTLP exporters retry without RetryInfo.
            metrics.requests.labels("grpc", "unavailable").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{e} (retry after {e.retry_after}s)")
        metrics.requests.labels("grpc", "ok").inc()
        reply = trace_service_pb2.ExportTraceServiceResponse()
        if decoded.rejected:
            metrics.rejected_spans.inc(decoded.rejected)
            reply.partial_success.rejected_spans = decoded.rejected
            reply.partial_success.error_message = decoded.error
        return reply

    return grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None,
        response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString)


def start_grpc(ingest: Ingest, host: str, port: int, workers: int = 4) -> tuple[grpc.Server, int]:
    """Start the OTLP/gRPC server; return it and the port it bound (for port 0)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
        options=[("grpc.max_receive_message_length", MAX_BODY_BYTES)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Export": _export_handler(ingest)}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {host}:{port}")
    server.start()
    return server, bound

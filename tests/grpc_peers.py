"""A real gRPC server and client (grpcio) for the tests that put gRPC on the wire: the tap's and the sidecar's.

`demo.Greeter` answers each way a gRPC call can end: a unary call, a server stream, a failure before any
message (trailers-only), a failure after one (in the trailers), and a call that outlives its deadline."""
from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from tests.waiting import PATIENCE_S

SERVICE = "demo.Greeter"


def _hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"hi " + request


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(3):
        yield b"part %d" % i


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such user: é")  # before any message: trailers-only


def _fail_late(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "stop here")  # after a message: in the trailers


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    while context.is_active():  # until the client's deadline ends the call
        time.sleep(0.02)
    return b""


def _upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(len(r) for r in requests)


def _echo(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield request
    yield request


METHODS = {"Hello": grpc.unary_unary_rpc_method_handler(_hello),
           "Stream": grpc.unary_stream_rpc_method_handler(_stream),
           "Fail": grpc.unary_unary_rpc_method_handler(_fail),
           "FailLate": grpc.unary_stream_rpc_method_handler(_fail_late),
           "Slow": grpc.unary_unary_rpc_method_handler(_slow),
           "Upload": grpc.stream_unary_rpc_method_handler(_upload),
           "Echo": grpc.unary_stream_rpc_method_handler(_echo)}


@contextmanager
def grpc_server(methods: dict | None = None) -> Iterator[int]:
    """A grpcio server on an ephemeral loopback port, stopped on exit."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, methods or METHODS)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(PATIENCE_S)


def run_grpc_client(port: int, authority: str | None = None, slow_timeout: float = 1.0) -> collections.Counter:
    """The calls of one channel (one connection) to 127.0.0.1:`port`, as the client saw them: (path, gRPC status
    code). `authority`: the :authority it sends (a sidecar's outbound listener routes by it)."""
    seen: collections.Counter = collections.Counter()
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        def call(kind: str, method: str, timeout: float = PATIENCE_S) -> None:
            path = f"/{SERVICE}/{method}"
            stub = channel.unary_unary(path) if kind == "unary" else channel.unary_stream(path)
            try:
                result = stub(b"x" * 10, timeout=timeout)
                if kind == "stream":
                    list(result)
                seen[(path, 0)] += 1
            except grpc.RpcError as e:
                seen[(path, e.code().value[0])] += 1
        for _ in range(3):
            call("unary", "Hello")
        call("stream", "Stream")
        call("unary", "Fail")
        call("stream", "FailLate")
        call("unary", "Slow", timeout=slow_timeout)
    return seen

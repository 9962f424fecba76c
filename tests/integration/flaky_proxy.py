"""A fault-injecting gRPC proxy for the SDK's retry tests: real server behind, real client in front."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Iterator

import grpc

from gradserve.v1 import sensitivity_service_pb2 as pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as pb2_grpc

__all__ = ["FlakyProxy"]


class FlakyProxy(grpc.GenericRpcHandler):
    """A gRPC proxy in front of a real server that injects failures: the first attempt of every
    unary call fails with ``first_code`` (UNAVAILABLE), every attempt of the methods in ``always``
    fails with their code, and the first ComputeStream breaks after ``break_after`` responses."""

    def __init__(self, upstream: str, break_after: int | None = 3, hold: bool = False,
                 first_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 always: dict[str, grpc.StatusCode] | None = None) -> None:
        self.first_code = first_code
        # always: method name (e.g. "GetModel") -> the code every attempt of it fails with.
        self.always = always or {}
        self.break_code = break_code
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb2_grpc.SensitivityServiceStub(self.channel)
        self.break_after = break_after
        self.attempts: list[tuple[str, str | None]] = []
        self.streams: list[list[str]] = []
        # hold: each stream response is released only once the next request (or the end of the
        # requests) has arrived, which only a pipelined client provides without waiting.
        self.hold = hold
        self.hold_timeouts = 0
        self.most_outstanding = 0
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: Any) -> Any:
        method = details.method
        if method.endswith("/ComputeStream"):
            return grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=pb2.ComputeStreamRequest.FromString,
                response_serializer=pb2.ComputeStreamResponse.SerializeToString)
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._unary(method, req, ctx))

    def _unary(self, method: str, request: bytes, context: Any) -> bytes:
        previous = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts")
        self.attempts.append((method, previous))
        code = self.always.get(method.rsplit("/", 1)[1])
        if code is not None:
            context.abort(code, "proxy: injected failure (always)")
        if previous is None:
            context.abort(self.first_code, "proxy: injected failure")
        try:
            return self.channel.unary_unary(method)(request, timeout=30)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
            raise

    def _stream(self, requests: Iterator[pb2.ComputeStreamRequest],
                context: Any) -> Iterator[pb2.ComputeStreamResponse]:
        number = len(self.streams)
        seen: list[str] = []
        self.streams.append(seen)
        arrived = threading.Condition()
        ended = [False]

        def tap() -> Iterator[pb2.ComputeStreamRequest]:
            for r in requests:
                with arrived:
                    seen.append(r.request.request_id)
                    arrived.notify_all()
                yield r
            with arrived:
                ended[0] = True
                arrived.notify_all()

        upstream = self.stub.ComputeStream(tap(), timeout=30)
        for i, response in enumerate(upstream):
            if number == 0 and i == self.break_after:
                upstream.cancel()
                context.abort(self.break_code, "proxy: injected stream break")
            if self.hold:
                with arrived:
                    if not arrived.wait_for(lambda i=i: len(seen) > i + 1 or ended[0], timeout=5):
                        self.hold_timeouts += 1
                    self.most_outstanding = max(self.most_outstanding, len(seen) - i)
            yield response

    def close(self) -> None:
        self.server.stop(0)
        self.channel.close()

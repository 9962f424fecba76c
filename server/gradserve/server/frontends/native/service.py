"""The native gRPC servicers (``gradserve.v1``): bytes -> neutral request -> data plane -> message.

Each handler gets its request as bytes (``add_to_server`` registers them without a
deserializer) and parses them itself (``rawbytes.parse``: malformed bytes are
INVALID_ARGUMENT, logged once a minute at most). A computing request is served inside the call
envelope (``ops.calls``: deadline, cancellation, request id, admission, memory budget, metrics,
logs, tracing), turned into the data plane's neutral request (``requests``), computed by
``DataPlane.compute`` and encoded (``encoding``). The concurrency model behind it (one event
loop, compute threads, the inline path, merged batches) is on the architecture page of the
documentation.

``ComputeStream`` reads requests as they arrive and starts each at once (so the requests of one
stream batch with each other and with other callers), answers them in request order, and keeps
at most ``stream_window`` requests between read and written (back-pressure). Each request of a
stream is a call of its own in the envelope (not counted against ``--max-concurrent-calls``:
the window bounds them), under the stream's deadline.
"""
from __future__ import annotations

import asyncio
import operator
from typing import Any, AsyncIterator, Callable

import grpc

from gradserve import _names
from gradserve.server.dataplane import DataPlane
from gradserve.server.frontends.native.encoding import compute_response, model_info_message
from gradserve.server.frontends.native.requests import compute_request
from gradserve.server.frontends.rawbytes import parse
from gradserve.server.frontends.shared_memory import OutputArea, SharedMemoryRegistry
from gradserve.server.ops import tracing
from gradserve.server.ops.calls import Call, CallEnvelope
from gradserve.server.ops.status import status_for
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["SensitivityServicer", "ModelServicer", "add_to_server"]

PROTOCOL = "native"


def _declared_batch(message: _pb2.ComputeRequest) -> int | None:
    """The batch size the first input's shape declares (None without one)."""
    for tensor in message.inputs.values():
        return int(tensor.shape[0]) if len(tensor.shape) else None
    return None


class SensitivityServicer:
    """Compute and ComputeStream (requests arrive as bytes; see ``add_to_server``).

    Parameters
    ----------
    dataplane
        Where requests are computed.
    envelope
        The server's call envelope.
    stream_window
        Requests of one stream between read and answered (default: the batching config's).
    shared_memory
        The server's shared-memory registry: tensors sent by reference (``Tensor.shared_memory``)
        are read from its native regions, and answers written into ``response_shared_memory``.
        None: a registry that is off (such requests get UNIMPLEMENTED).
    """

    def __init__(self, dataplane: DataPlane, envelope: CallEnvelope, stream_window: int | None = None,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        self._plane = dataplane
        self._envelope = envelope
        self._stream_window = max(1, stream_window or dataplane.runner.batching.stream_window)
        self._shm = shared_memory or SharedMemoryRegistry(enabled=False)

    async def _compute(self, call: Call, data: bytes, message: _pb2.ComputeRequest) -> _pb2.ComputeResponse:
        call.describe(message.model, _names.METHODS.name(message.method) or "invalid", None, message.request_id)
        call.admit(len(data), kind="call" if call.rpc == "Compute" else None)
        # The regions the request names are held until its answer is written (or it failed).
        with self._shm.borrow(native=True) as regions:
            try:
                request = compute_request(message, self._plane.limits, len(data), regions)
            except Exception:
                call.batch = _declared_batch(message)  # a malformed tensor still counts its rows
                raise
            # The batch label from the decoded arrays: walking the message's input map once more
            # for it cost a batch-1 call ~5% of its handler in the server.
            call.batch = request.batch_size
            area = None
            if message.HasField("response_shared_memory"):
                where = message.response_shared_memory
                area = OutputArea(regions, where.region, where.offset, where.byte_size, "response_shared_memory")
            result = await call.run(self._plane.compute(request, call.control))
            if not tracing.ACTIVE:
                return compute_response(result, message.request_id, area)
            with tracing.span("encode"):
                return compute_response(result, message.request_id, area)

    async def Compute(self, data: bytes, context: grpc.aio.ServicerContext) -> _pb2.ComputeResponse:
        with self._envelope.open(PROTOCOL, "Compute", context.time_remaining()) as call:
            return await self._compute(call, data, parse(_pb2.ComputeRequest, data))
        await context.abort(call.code, call.message)
        raise AssertionError("unreachable")  # abort raises

    async def _answer(self, data: bytes, deadline: float | None) -> _pb2.ComputeStreamResponse:
        """One stream request's response; errors, a malformed message too, are answered in-band."""
        request_id = ""
        with self._envelope.open(PROTOCOL, "ComputeStream", deadline=deadline, in_stream=True) as call:
            message = parse(_pb2.ComputeStreamRequest, data).request
            request_id = message.request_id
            response = await self._compute(call, data, message)
            return _pb2.ComputeStreamResponse(request_id=request_id, response=response)
        return _pb2.ComputeStreamResponse(request_id=request_id,
                                          error=_pb2.Status(code=call.code.value[0], message=call.message))

    async def ComputeStream(self, request_iterator: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.ComputeStreamResponse]:
        # A reader task starts each request as it arrives, while this generator answers them in
        # request order. At most ``stream_window`` requests are between "read" and "written":
        # when the caller reads slowly, the writes block, the reader stops reading, and HTTP/2
        # flow control pushes back on the caller instead of the server buffering without bound.
        # A stream may legitimately stay open for long: only the caller's own deadline (cut to
        # the maximum) applies to its requests, not the default.
        with self._envelope.open(PROTOCOL, "ComputeStream", context.time_remaining(), stream=True) as stream:
            deadline = stream.control.deadline
            slots = asyncio.Semaphore(self._stream_window)
            order: asyncio.Queue[asyncio.Future[_pb2.ComputeStreamResponse] | None] = asyncio.Queue()
            start = asyncio.get_running_loop().create_task

            async def read() -> None:
                try:
                    async for data in request_iterator:
                        await slots.acquire()
                        order.put_nowait(start(self._answer(data, deadline)))
                finally:
                    order.put_nowait(None)

            reader = start(read())
            try:
                while (task := await order.get()) is not None:
                    yield await task
                    slots.release()
                await reader  # re-raises a failure to read the stream
            finally:
                # Cancelled, client gone, or done: stop this stream's work.
                reader.cancel()
                while not order.empty():
                    left = order.get_nowait()
                    if left is not None:
                        left.cancel()
        if stream.code is not grpc.StatusCode.OK:
            await context.abort(stream.code, stream.message)


class ModelServicer:
    """ListModels and GetModel (requests arrive as bytes; see ``add_to_server``)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._plane = dataplane

    async def ListModels(self, data: bytes, context: grpc.aio.ServicerContext) -> _model_pb2.ListModelsResponse:
        try:
            parse(_model_pb2.ListModelsRequest, data)
            return _model_pb2.ListModelsResponse(models=[model_info_message(m) for m in self._plane.list_models()])
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

    async def GetModel(self, data: bytes, context: grpc.aio.ServicerContext) -> _model_pb2.GetModelResponse:
        try:
            request = parse(_model_pb2.GetModelRequest, data)
            return _model_pb2.GetModelResponse(model=model_info_message(self._plane.model_info(request.name)))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises


_serialize: Callable[[Any], bytes] = operator.methodcaller("SerializeToString")


def add_to_server(server: grpc.aio.Server, sensitivity: SensitivityServicer, models: ModelServicer,
                  guard_stream: Callable[[Any], Any]) -> None:
    """Register both services with no request deserializer: handlers get the request bytes and
    parse them (``rawbytes.parse``), so malformed bytes are INVALID_ARGUMENT, never gRPC's
    UNKNOWN. ``guard_stream`` puts ComputeStream behind the stream limits (``ops.admission``)."""
    def service(name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(name, handlers)

    server.add_generic_rpc_handlers((
        service(_pb2.DESCRIPTOR.services_by_name["SensitivityService"].full_name, {
            "Compute": grpc.unary_unary_rpc_method_handler(sensitivity.Compute, response_serializer=_serialize),
            "ComputeStream": grpc.stream_stream_rpc_method_handler(guard_stream(sensitivity.ComputeStream),
                                                                   response_serializer=_serialize),
        }),
        service(_model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name, {
            "ListModels": grpc.unary_unary_rpc_method_handler(models.ListModels, response_serializer=_serialize),
            "GetModel": grpc.unary_unary_rpc_method_handler(models.GetModel, response_serializer=_serialize),
        }),
    ))

"""The native gRPC servicers: thin translators over the data plane (bytes -> ``DataPlane`` -> message).

A request's way through the server, module by module:

- ``service`` (here): the handlers get each request as bytes (``add_to_server`` registers them
  without a deserializer) and parse it themselves (``parse``: malformed bytes are
  INVALID_ARGUMENT, logged once a minute at most); they open the call's ``calls.CallControl``
  (deadline, cancellation, request id), record metrics and logs (``calls.CallRecorder``) and
  turn errors into a status once (``status``), outside the deadline's scope so that a deadline
  firing meanwhile cannot abort twice.
- ``dataplane.DataPlane``: resolves the model version (the one name check), validates
  (``validation``: the only reader of request fields, into ``spec.ComputeSpec`` with the
  method's typed options), plans (``methods``: a ``spec.PreparedCall`` with a hashable key) and
  runs (``runner.ComputeRunner`` -> ``batcher.DynamicBatcher`` -> ``engine``), returning a
  ``dataplane.ComputeResult`` of NumPy arrays; other front-ends call it the same way.
- ``encoding``: ComputeResponse and ModelInfo messages from the data plane's results.

Concurrency model
-----------------
- One ``grpc.aio`` event loop owns every RPC. It does the per-request Python work: parse,
  validation, planning, queueing and encoding.
- ``runner.ComputeRunner`` keeps one ``DynamicBatcher`` per model version on that loop and a
  pool of compute threads (``--compute-threads``, default 2). An engine call, merged or not,
  is one hop to a compute thread; TensorFlow releases the GIL inside its kernels, so a long
  call never stalls the I/O of other requests. A model runs one merged call at a time (what
  arrives during it is merged into the next); the other threads let other models run
  meanwhile. The exception is the inline path: a request that finds its model idle runs on the
  loop itself when its kind of engine call measured at most ``--inline-max-us`` (default 100 us;
  a TensorFlow call is slower than that, a LiteRT batch-1 call far faster), because the hop to
  a thread and back costs the loop more than such a call.
- ``ComputeStream`` reads requests as they arrive and starts each at once (so the requests of
  one stream batch with each other and with other callers), answers them in request order, and
  keeps at most ``stream_window`` requests between read and written (back-pressure).

Why this model (measured with ``python bench/run.py``, cProfile of the loop and per-thread CPU
time from ``/proc`` with batch-1 ``dense2`` clients; see README "Performance"): half of a
batch-1 request's loop CPU is gRPC's own per-RPC work; parsing, validation, planning and
encoding are ~25 us; a TensorFlow engine call costs a compute thread 230-320 us (mostly
TensorFlow's Python dispatch, which holds the GIL). Whatever the loop does that gives up the GIL
(a system call, a wake-up) costs it a wait for a compute thread's Python to let go: hence
counter-based request ids and no interceptor pipeline (grpc.aio runs a chain of coroutines per
RPC for interceptors; the handlers call ``calls`` directly). Running TensorFlow on the loop
would stall every other RPC for that long; running it on more threads than cores only adds GIL
contention. The batcher costs a lone caller nothing measurable because an idle engine is
dispatched at once. Under load, merging turns many engine calls into few (5-10 requests per
call at 64 clients); what remains is the loop's per-request work, and the answer to more
throughput there is more processes (``--workers``), not more threads.
"""
from __future__ import annotations

import asyncio
import logging
import operator
import time
from typing import Any, AsyncIterator, Callable, NoReturn, TypeVar

import grpc

from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.dataplane.plane import DataPlane
from gradserve.server.frontends.native.encoding import compute_response, model_info_message
from gradserve.server.ops import tracing
from gradserve.server.ops.calls import CallControl, CallRecorder, activate, effective_timeout, new_request_id
from gradserve.server.ops.status import status_for
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["SensitivityServicer", "ModelServicer", "add_to_server", "parse"]

_log = logging.getLogger("gradserve.server")

Message = TypeVar("Message", _pb2.ComputeRequest, _pb2.ComputeStreamRequest, _model_pb2.GetModelRequest,
                  _model_pb2.ListModelsRequest)

#: Malformed requests are logged at most once per this many seconds (with a count), not per
#: request: a flood of bad bytes must not become a flood of log lines.
MALFORMED_LOG_INTERVAL_S = 60.0
_malformed = {"count": 0, "next": 0.0}


def parse(cls: type[Message], data: bytes) -> Message:
    """Parse a request message from its bytes; INVALID_ARGUMENT (short, no exception class) when
    they are not one. Every RPC's request is parsed here, not by gRPC (``add_to_server``)."""
    message = cls()
    try:
        message.ParseFromString(data)
        return message
    except Exception:  # noqa: BLE001 - DecodeError, or a nesting the parser refuses
        _malformed["count"] += 1
        now = time.monotonic()
        if now >= _malformed["next"]:
            _log.warning("refused %d malformed request message(s) since the last report (latest: %s, %d bytes)",
                         _malformed["count"], cls.DESCRIPTOR.name, len(data))
            _malformed["count"], _malformed["next"] = 0, now + MALFORMED_LOG_INTERVAL_S
        raise InvalidArgumentError(f"request: not a valid {cls.DESCRIPTOR.full_name} message") from None


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


class SensitivityServicer:
    """Compute and ComputeStream (requests arrive as bytes; see ``add_to_server``).

    Parameters
    ----------
    dataplane
        Where requests are computed.
    recorder
        Metrics and request logs (None: none).
    stream_window
        Requests of one stream between read and answered (default: the batching config's).
    """

    def __init__(self, dataplane: DataPlane, recorder: CallRecorder | None = None,
                 stream_window: int | None = None) -> None:
        self._plane = dataplane
        self._limits: Limits = dataplane.limits
        self._recorder = recorder or CallRecorder()
        self._stream_window = max(1, stream_window or dataplane.runner.batching.stream_window)

    async def Compute(self, data: bytes, context: grpc.aio.ServicerContext) -> _pb2.ComputeResponse:
        start = time.perf_counter()
        # The call's timeout: the caller's deadline, or the default one, cut to the maximum.
        remaining = context.time_remaining()
        timeout = effective_timeout(remaining, self._limits)
        control = CallControl(time.monotonic() + timeout)
        token = activate(control)
        request: _pb2.ComputeRequest | None = None
        code = grpc.StatusCode.OK
        gauge = self._recorder.unary_gauge
        if gauge is not None:
            gauge.inc()
        try:
            try:
                request = parse(_pb2.ComputeRequest, data)
                control.request_id = request.request_id or new_request_id()
                if remaining is not None and timeout >= remaining:
                    # The caller's own deadline binds: gRPC ends the call then (CancelledError
                    # here) and the caller reports DEADLINE_EXCEEDED; no timer of ours is needed.
                    result = await self._plane.compute(request, control.deadline, len(data))
                else:
                    async with asyncio.timeout(timeout):
                        result = await self._plane.compute(request, control.deadline, len(data))
                with tracing.span("encode"):
                    return compute_response(result, request.request_id)
            except TimeoutError:
                control.cancelled.set()
                code, message = (grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"deadline: the call ran past its deadline of {timeout:.3f} s")
            except asyncio.CancelledError:  # the caller went away, or its deadline passed
                control.cancelled.set()
                late = control.deadline is not None and time.monotonic() >= control.deadline
                code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                code, message = status_for(exc, control.request_id)
        finally:
            if gauge is not None:
                gauge.dec()
            token.var.reset(token)
            self._recorder.record(request, code, time.perf_counter() - start, control.request_id,
                                  code is grpc.StatusCode.OK)
        # Outside the timeout: a deadline that fires now cannot abort a second time.
        await _abort(context, code, message)

    async def _answer(self, data: bytes, deadline: float | None) -> _pb2.ComputeStreamResponse:
        """One stream request's response; errors, a malformed message too, are answered in-band."""
        start = time.perf_counter()
        request: _pb2.ComputeRequest | None = None
        try:
            request = parse(_pb2.ComputeStreamRequest, data).request
            result = await self._plane.compute(request, deadline, len(data))
            with tracing.span("encode"):
                response = _pb2.ComputeStreamResponse(request_id=request.request_id,
                                                      response=compute_response(result, request.request_id))
            self._recorder.record(request, 0, time.perf_counter() - start, request.request_id, True)
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered in-band; the stream goes on
            request_id = "" if request is None else request.request_id
            code, text = status_for(exc, request_id)
            self._recorder.record(request, code, time.perf_counter() - start, request_id)
            return _pb2.ComputeStreamResponse(request_id=request_id,
                                              error=_pb2.Status(code=code.value[0], message=text))

    async def ComputeStream(self, request_iterator: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.ComputeStreamResponse]:
        # A reader task starts each request as it arrives (so that the requests of one stream
        # batch with each other and with other callers), while this generator answers them in
        # request order. At most ``stream_window`` requests are between "read" and "written":
        # when the caller reads slowly, the writes block, the reader stops reading, and HTTP/2
        # flow control pushes back on the caller instead of the server buffering without bound.
        # A stream may legitimately stay open for long: only the caller's own deadline (cut to
        # the maximum) applies to its requests, not the default.
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + min(remaining, self._limits.max_deadline_s)
        control = CallControl(deadline)
        activate(control)
        slots = asyncio.Semaphore(self._stream_window)
        order: asyncio.Queue[asyncio.Future[_pb2.ComputeStreamResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for data in request_iterator:
                    await slots.acquire()
                    order.put_nowait(asyncio.ensure_future(self._answer(data, deadline)))
            finally:
                order.put_nowait(None)

        gauge = self._recorder.stream_gauge
        if gauge is not None:
            gauge.inc()
        reader = asyncio.ensure_future(read())
        try:
            while (task := await order.get()) is not None:
                yield await task
                slots.release()
            await reader  # re-raises a failure to read the stream
        except BaseException:
            # Cancelled, client gone, or the stream failed: stop this stream's work.
            control.cancelled.set()
            raise
        finally:
            if gauge is not None:
                gauge.dec()
            reader.cancel()
            while not order.empty():
                left = order.get_nowait()
                if left is not None:
                    left.cancel()


class ModelServicer:
    """ListModels and GetModel (requests arrive as bytes; see ``add_to_server``)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._plane = dataplane

    async def ListModels(self, data: bytes, context: grpc.aio.ServicerContext) -> _model_pb2.ListModelsResponse:
        try:
            parse(_model_pb2.ListModelsRequest, data)
            return _model_pb2.ListModelsResponse(models=[model_info_message(m) for m in self._plane.list_models()])
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await _abort(context, code, message)

    async def GetModel(self, data: bytes, context: grpc.aio.ServicerContext) -> _model_pb2.GetModelResponse:
        try:
            request = parse(_model_pb2.GetModelRequest, data)
            return _model_pb2.GetModelResponse(model=model_info_message(self._plane.model_info(request.name)))
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await _abort(context, code, message)


_serialize: Callable[[Any], bytes] = operator.methodcaller("SerializeToString")


def add_to_server(server: grpc.aio.Server, sensitivity: SensitivityServicer, models: ModelServicer) -> None:
    """Register both services with no request deserializer: handlers get the request bytes and
    parse them (``parse``), so malformed bytes are INVALID_ARGUMENT, never gRPC's UNKNOWN."""
    def service(name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(name, handlers)

    server.add_generic_rpc_handlers((
        service(_pb2.DESCRIPTOR.services_by_name["SensitivityService"].full_name, {
            "Compute": grpc.unary_unary_rpc_method_handler(sensitivity.Compute, response_serializer=_serialize),
            "ComputeStream": grpc.stream_stream_rpc_method_handler(sensitivity.ComputeStream,
                                                                   response_serializer=_serialize),
        }),
        service(_model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name, {
            "ListModels": grpc.unary_unary_rpc_method_handler(models.ListModels, response_serializer=_serialize),
            "GetModel": grpc.unary_unary_rpc_method_handler(models.GetModel, response_serializer=_serialize),
        }),
    ))

"""The native gRPC servicers: thin translators over the data plane (decode -> ``DataPlane`` -> encode).

Validation, planning and compute live in ``dataplane`` (and the modules it calls), response and
model-info messages in ``encoding``, status codes in ``status``.

Concurrency model
-----------------
- One ``grpc.aio`` event loop owns every RPC. It does the per-request Python work: parse,
  validation, planning, queueing and encoding, and never runs TensorFlow.
- ``runner.ComputeRunner`` keeps one ``DynamicBatcher`` per model version on that loop and a pool of
  compute threads (``--compute-threads``, default 2). Each engine call, merged or not, is one
  hop to a compute thread; TensorFlow releases the GIL inside its kernels, so a long call never
  stalls the I/O of other requests. A model runs one merged call at a time (what arrives during
  it is merged into the next); the other threads let other models run meanwhile.
- ``ComputeStream`` reads requests as they arrive and starts each at once (so the requests of
  one stream batch with each other and with other callers), answers them in request order, and
  keeps at most ``stream_window`` requests between read and written (back-pressure).

Why this model (measured with ``python bench/run.py``, cProfile of the loop and per-thread CPU
time from ``/proc`` with batch-1 ``dense2`` clients; see README "Performance"): a batch-1
request costs the loop about 450 us of CPU (half of it gRPC's own per-RPC work; parsing,
validation, planning and encoding are ~25 us) and a compute thread 230-320 us per engine call
(mostly TensorFlow's Python dispatch, which holds the GIL; ~100 us less since the engine calls
the flat entry point of its concrete functions). Whatever the loop does that gives up the GIL
(a system call, a wake-up) costs it a wait for a compute thread's Python to let go: hence
counter-based request ids and no per-RPC interceptor pipeline (``calls.CallInterceptor.wrap``).
Running TensorFlow on the loop would stall every other RPC for that long; running it on more
threads than cores only adds GIL contention. The batcher costs a lone caller nothing measurable
(2.21 vs 2.25 ms p50 against a direct ``run_in_executor``, interleaved) because an idle engine
is dispatched at once. Under load, merging turns many engine calls into few (5-10 requests per
call at 64 clients; 2.2-2.3x the requests per second of batching off for ``dense2`` and
``cnn``); what remains is the loop's per-request work, and the answer to more throughput there
is more processes, not more threads.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, NoReturn

import grpc

from gradserve.server.dataplane import DataPlane
from gradserve.server.encoding import compute_response, model_info_message
from gradserve.server.status import status_for
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as _grpc

__all__ = ["SensitivityServicer", "ModelServicer"]


class SensitivityServicer(_grpc.SensitivityServiceServicer):
    """Compute and ComputeStream."""

    def __init__(self, dataplane: DataPlane, stream_window: int | None = None) -> None:
        self._plane = dataplane
        self._stream_window = max(1, stream_window or dataplane.runner.batching.stream_window)

    async def compute_one(self, req: _pb2.ComputeRequest, deadline: float | None = None) -> _pb2.ComputeResponse:
        """One request's response; raises domain errors."""
        return compute_response(await self._plane.compute(req, deadline), req.request_id)

    async def Compute(self, request: _pb2.ComputeRequest,
                      context: grpc.aio.ServicerContext) -> _pb2.ComputeResponse:
        try:
            return await self.compute_one(request, _deadline_of(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc, request.request_id)
        await _abort(context, code, message)

    async def _answer(self, message: _pb2.ComputeStreamRequest, deadline: float | None) -> _pb2.ComputeStreamResponse:
        """One stream request's response; errors are answered in-band."""
        request = message.request
        try:
            return _pb2.ComputeStreamResponse(request_id=request.request_id,
                                              response=await self.compute_one(request, deadline))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered in-band; the stream goes on
            code, text = status_for(exc, request.request_id)
            return _pb2.ComputeStreamResponse(request_id=request.request_id,
                                              error=_pb2.Status(code=code.value[0], message=text))

    async def ComputeStream(self, request_iterator: AsyncIterator[_pb2.ComputeStreamRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.ComputeStreamResponse]:
        # A reader task starts each request as it arrives (so that the requests of one stream
        # batch with each other and with other callers), while this generator answers them in
        # request order. At most ``stream_window`` requests are between "read" and "written":
        # when the caller reads slowly, the writes block, the reader stops reading, and HTTP/2
        # flow control pushes back on the caller instead of the server buffering without bound.
        deadline = _deadline_of(context)
        slots = asyncio.Semaphore(self._stream_window)
        order: asyncio.Queue[asyncio.Future[_pb2.ComputeStreamResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    order.put_nowait(asyncio.ensure_future(self._answer(request, deadline)))
            finally:
                order.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await order.get()) is not None:
                yield await task
                slots.release()
            await reader  # re-raises a failure to read the stream
        finally:
            reader.cancel()
            while not order.empty():
                left = order.get_nowait()
                if left is not None:
                    left.cancel()


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as an absolute ``time.monotonic()`` time (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


class ModelServicer(_model_grpc.ModelServiceServicer):
    """ListModels and GetModel."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._plane = dataplane

    async def ListModels(self, request: _model_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> _model_pb2.ListModelsResponse:
        try:
            return _model_pb2.ListModelsResponse(models=[model_info_message(m) for m in self._plane.list_models()])
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await _abort(context, code, message)

    async def GetModel(self, request: _model_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> _model_pb2.GetModelResponse:
        try:
            return _model_pb2.GetModelResponse(model=model_info_message(self._plane.model_info(request.name)))
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await _abort(context, code, message)

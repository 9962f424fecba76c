"""gRPC servicers: decode and validate, run on the engine, encode. Nothing else lives here.

Concurrency model
-----------------
- One ``grpc.aio`` event loop owns every RPC. It does the per-request Python work: parse,
  validation, planning, queueing and encoding, and never runs TensorFlow.
- ``ComputeRunner`` keeps one ``DynamicBatcher`` per model version on that loop and a pool of
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
import concurrent.futures
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Mapping

import grpc
import numpy as np

from gradserve import _codec
from gradserve.server import calls, methods
from gradserve.server.batcher import BatcherStats, DynamicBatcher
from gradserve.server.config import BatchingConfig, Limits
from gradserve.server.errors import DeadlineExceededError
from gradserve.server.repository import ModelRepository, ModelState, ModelVersion
from gradserve.server.spec import ATTRIBUTION, EXTRA, OUTPUT, TARGET_INDICES, PreparedCall
from gradserve.server.status import status_for
from gradserve.server.loading import validate_model_name
from gradserve.server.validation import check_model_ref, validate_request
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as _grpc

__all__ = ["ComputeRunner", "SensitivityServicer", "ModelServicer", "encode_response"]

_log = logging.getLogger("gradserve.server")

_STATES = {ModelState.LOADING: _model_pb2.MODEL_STATE_LOADING, ModelState.READY: _model_pb2.MODEL_STATE_READY,
           ModelState.FAILED: _model_pb2.MODEL_STATE_FAILED,
           ModelState.UNLOADING: _model_pb2.MODEL_STATE_UNLOADING}


class ComputeRunner:
    """Runs prepared calls on the engine, off the event loop, through one ``DynamicBatcher`` per
    model version (or straight on the compute threads where batching is off).

    Parameters
    ----------
    threads
        Compute threads (TensorFlow calls), shared by the models.
    batching
        Batching defaults.
    model_batching
        Per-model overrides of ``batching``, by model name.
    """

    def __init__(self, threads: int, batching: BatchingConfig | None = None,
                 model_batching: Mapping[str, BatchingConfig] | None = None) -> None:
        self.threads = max(1, threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="gradserve-compute")
        self.batching = batching or BatchingConfig()
        self._per_model = dict(model_batching or {})
        # (name, version) -> (engine, batcher); a reloaded version gets a new engine and batcher.
        # Read on the event loop, pruned by ``forget`` from the repository's threads.
        self._batchers: dict[tuple[str, int], tuple[Any, DynamicBatcher]] = {}
        self._lock = threading.Lock()
        #: Told of every merged engine call: (model name, rows, queue wait in seconds).
        self.observer: Callable[[str, int, float], None] | None = None

    def config_for(self, model: str) -> BatchingConfig:
        """The batching configuration of ``model`` (its override, else the default)."""
        return self._per_model.get(model, self.batching)

    def batcher(self, mv: ModelVersion) -> DynamicBatcher:
        """The batcher of one model version (created on first use)."""
        key = (mv.name, mv.version)
        entry = self._batchers.get(key)
        if entry is None or entry[0] is not mv.engine:
            assert mv.engine is not None
            cfg = self.config_for(mv.name)
            entry = (mv.engine, DynamicBatcher(mv.engine.run, self._pool, cfg, min(cfg.max_inflight, self.threads)))
            if self.observer is not None:
                observer, name = self.observer, mv.name
                entry[1].observer = lambda rows, wait: observer(name, rows, wait)
            if mv.state is ModelState.READY:  # an unloading version's last requests are not remembered
                with self._lock:
                    self._batchers[key] = entry
        return entry[1]

    def forget(self, mv: ModelVersion) -> None:
        """Drop the batcher of a version that is unloading or failed, so that its engine can be
        freed once its last requests (which keep their batcher) are done. A repository listener."""
        if mv.state not in (ModelState.UNLOADING, ModelState.FAILED):
            return
        with self._lock:
            entry = self._batchers.get((mv.name, mv.version))
            if entry is not None and entry[0] is mv.engine:
                del self._batchers[(mv.name, mv.version)]

    def batcher_stats(self) -> dict[tuple[str, int], BatcherStats]:
        """Counters of every live batcher, by (model, version)."""
        with self._lock:
            return {key: batcher.stats for key, (_, batcher) in self._batchers.items()}

    async def run(self, mv: ModelVersion, call: PreparedCall, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Compute ``call`` on ``mv``'s engine.

        ``deadline`` is an absolute ``time.monotonic()`` time: a request still queued then is
        answered DEADLINE_EXCEEDED without being computed.
        """
        assert mv.engine is not None
        if self.config_for(mv.name).enabled:
            return await self.batcher(mv).submit(call, deadline)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError("deadline: the request's deadline passed before it was computed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, mv.engine.run, call)

    def close(self) -> None:
        """Fail what is queued and stop the compute threads (server shutdown)."""
        with self._lock:
            batchers = [batcher for _, batcher in self._batchers.values()]
        for batcher in batchers:
            batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def encode_response(req: _pb2.ComputeRequest, mv: ModelVersion,
                    result: dict[str, np.ndarray]) -> _pb2.ComputeResponse:
    """Pack the engine's flat result dict into a ComputeResponse."""
    resp = _pb2.ComputeResponse(request_id=req.request_id, model=mv.name, version=mv.version)
    for key, arr in result.items():
        for prefix, target in ((OUTPUT, resp.outputs), (ATTRIBUTION, resp.attributions), (EXTRA, resp.extras)):
            if key.startswith(prefix):
                name = key[len(prefix):]
                _codec.encode(arr, name, out=target[name])
                break
        else:
            if key == TARGET_INDICES and req.target.kind in (_pb2.TARGET_KIND_INDEX, _pb2.TARGET_KIND_ARGMAX):
                resp.target_indices.extend(int(i) for i in arr)
    return resp


class SensitivityServicer(_grpc.SensitivityServiceServicer):
    """Compute and ComputeStream."""

    def __init__(self, repository: ModelRepository, runner: ComputeRunner, limits: Limits,
                 stream_window: int | None = None) -> None:
        self._repo = repository
        self._runner = runner
        self._limits = limits
        self._stream_window = max(1, stream_window or runner.batching.stream_window)

    async def compute_one(self, req: _pb2.ComputeRequest, deadline: float | None = None) -> _pb2.ComputeResponse:
        """Validate, run and encode one request; raises domain errors.

        ``deadline`` (absolute ``time.monotonic()``) lets the batcher drop the request unrun
        once it has passed.
        """
        check_model_ref(req.model, req.version)  # path-like names never reach the repository
        mv = self._repo.get(req.model, req.version)
        with mv.acquire():  # an unloading version waits for this request before it goes
            spec = validate_request(req, mv.model, self._limits)
            # attach: the call's deadline (the default one too) and cancellation flag; work
            # whose deadline has passed stops here and the engine stops between chunks.
            call = calls.attach(methods.get(spec.method).plan(spec, mv.model, self._limits))
            result = await self._runner.run(mv, call, call.deadline if deadline is None else deadline)
            return encode_response(req, mv, result)

    async def Compute(self, request: _pb2.ComputeRequest,
                      context: grpc.aio.ServicerContext) -> _pb2.ComputeResponse:
        try:
            return await self.compute_one(request, _deadline_of(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc, request.request_id)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

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


def _tensor_specs(specs: tuple) -> list[_model_pb2.TensorSpec]:  # type: ignore[type-arg]
    return [_model_pb2.TensorSpec(name=s.name, dtype=_codec.dtype_to_wire(s.dtype), differentiable=s.differentiable,
                                  shape=[-1 if d is None else d for d in s.shape]) for s in specs]


def model_info(repo: ModelRepository, name: str) -> _model_pb2.ModelInfo:
    info = _model_pb2.ModelInfo(name=name)
    for mv in repo.versions(name):
        v = info.versions.add(version=mv.version, state=_STATES[mv.state], message=mv.message, source=mv.source)
        if mv.engine is not None:
            eng = mv.engine
            v.inputs.extend(_tensor_specs(eng.model.inputs))
            v.outputs.extend(_tensor_specs(eng.model.outputs))
            v.xla = eng.xla
            v.device = eng.device
            v.batch_buckets.extend(eng.buckets)
            v.layers.extend(eng.model.layer_names())
            v.trace_counts.update(eng.trace_counts)
            v.compile_counts.update(eng.compile_counts)
    return info


class ModelServicer(_model_grpc.ModelServiceServicer):
    """ListModels and GetModel."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repo = repository

    async def ListModels(self, request: _model_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> _model_pb2.ListModelsResponse:
        return _model_pb2.ListModelsResponse(models=[model_info(self._repo, n) for n in self._repo.names()])

    async def GetModel(self, request: _model_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> _model_pb2.GetModelResponse:
        try:
            validate_model_name(request.name, "name")  # a path-like name is malformed, not unknown
            return _model_pb2.GetModelResponse(model=model_info(self._repo, request.name))
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable")

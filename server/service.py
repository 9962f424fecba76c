"""gRPC servicers: decode and validate, run on the engine, encode. Nothing else lives here.

Concurrency model: the server is ``grpc.aio``: every RPC is a coroutine on one event loop, which
only does I/O, decoding and validation. TensorFlow work runs on ``ComputeRunner``'s threads, so
a long compiled call never stalls the I/O of other requests (TensorFlow releases the GIL while
its kernels run).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import AsyncIterator

import grpc
import numpy as np
from google.rpc import status_pb2

from gradserve import _codec
from gradserve.server import methods
from gradserve.server.config import Limits
from gradserve.server.repository import ModelRepository, ModelState, ModelVersion
from gradserve.server.spec import ATTRIBUTION, EXTRA, OUTPUT, TARGET_INDICES, PreparedCall
from gradserve.server.status import status_for
from gradserve.server.validation import validate_request
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
    """Runs prepared calls on the engine, off the event loop."""

    def __init__(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gradserve-compute")

    async def run(self, mv: ModelVersion, call: PreparedCall) -> dict[str, np.ndarray]:
        assert mv.engine is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, mv.engine.run, call)

    def close(self) -> None:
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

    def __init__(self, repository: ModelRepository, runner: ComputeRunner, limits: Limits) -> None:
        self._repo = repository
        self._runner = runner
        self._limits = limits

    async def compute_one(self, req: _pb2.ComputeRequest) -> _pb2.ComputeResponse:
        """Validate, run and encode one request; raises domain errors."""
        mv = self._repo.get(req.model, req.version)
        spec = validate_request(req, mv.model, self._limits)
        call = methods.get(spec.method).plan(spec, mv.model, self._limits)
        result = await self._runner.run(mv, call)
        return encode_response(req, mv, result)

    async def Compute(self, request: _pb2.ComputeRequest,
                      context: grpc.aio.ServicerContext) -> _pb2.ComputeResponse:
        try:
            return await self.compute_one(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc, request.request_id)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

    async def ComputeStream(self, request_iterator: AsyncIterator[_pb2.ComputeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.ComputeResponse]:
        async for request in request_iterator:
            try:
                yield await self.compute_one(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - answered in-band; the stream goes on
                code, message = status_for(exc, request.request_id)
                yield _pb2.ComputeResponse(request_id=request.request_id, model=request.model,
                                           error=status_pb2.Status(code=code.value[0], message=message))


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
            return _model_pb2.GetModelResponse(model=model_info(self._repo, request.name))
        except Exception as exc:  # noqa: BLE001
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable")

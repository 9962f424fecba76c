"""The native protocol's messages built from the data plane's plain results (``dataplane``)."""
from __future__ import annotations

import numpy as np

from gradserve import _codec
from gradserve.server.core.models import ModelState, TensorSpec
from gradserve.server.core.results import ComputeResult, ModelInfo
from gradserve.server.frontends.shared_memory import OutputArea
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["compute_response", "model_info_message"]

_STATES = {ModelState.LOADING: _model_pb2.MODEL_STATE_LOADING, ModelState.READY: _model_pb2.MODEL_STATE_READY,
           ModelState.FAILED: _model_pb2.MODEL_STATE_FAILED,
           ModelState.UNLOADING: _model_pb2.MODEL_STATE_UNLOADING}


#: Wire dtype codes of the native-order NumPy dtypes (the engine's answers are such arrays).
_WIRE = {np.dtype(dtype): code for code, dtype in _codec.DTYPES.items()}


def compute_response(result: ComputeResult, request_id: str, area: OutputArea | None = None) -> _pb2.ComputeResponse:
    """A ComputeResponse holding ``result``'s arrays; with ``area`` (the request's
    ``response_shared_memory``) those that fit are written there and sent by reference."""
    resp = _pb2.ComputeResponse(request_id=request_id, model=result.model, version=result.version)
    for arrays, target in ((result.outputs, resp.outputs), (result.attributions, resp.attributions),
                           (result.extras, resp.extras)):
        for name, arr in arrays.items():
            offset = area.place(arr) if area is not None else None
            if offset is None:
                code = _WIRE.get(arr.dtype)
                if code is None:  # another byte order or an alias: the codec converts it
                    _codec.encode(arr, name, out=target[name])
                    continue
                tensor = target[name]
                tensor.dtype = code
                tensor.shape.extend(arr.shape)
                tensor.data = arr.tobytes()  # C order, whatever the array's layout
                continue
            tensor = target[name]
            tensor.dtype = _codec.dtype_to_wire(arr.dtype, name)
            tensor.shape.extend(arr.shape)
            tensor.shared_memory.region = area.region  # type: ignore[union-attr]  # offset: area is set
            tensor.shared_memory.offset = offset
            tensor.shared_memory.byte_size = arr.nbytes
    if result.target_indices is not None:
        resp.target_indices.extend(result.target_indices.tolist())
    return resp


def _tensor_specs(specs: tuple[TensorSpec, ...]) -> list[_model_pb2.TensorSpec]:
    return [_model_pb2.TensorSpec(name=s.name, dtype=_tensor_pb2.DataType.ValueType(_codec.dtype_to_wire(s.dtype)),
                                  differentiable=s.differentiable, shape=[-1 if d is None else d for d in s.shape])
            for s in specs]


def model_info_message(info: ModelInfo) -> _model_pb2.ModelInfo:
    """A ModelInfo message of the data plane's ``ModelInfo``."""
    msg = _model_pb2.ModelInfo(name=info.name)
    for v in info.versions:
        out = msg.versions.add(version=v.version, state=_STATES[v.state], message=v.message, source=v.source)
        out.inputs.extend(_tensor_specs(v.inputs))
        out.outputs.extend(_tensor_specs(v.outputs))
        out.xla = v.xla
        out.device = v.device
        out.batch_buckets.extend(v.batch_buckets)
        out.layers.extend(v.layers)
        out.trace_counts.update(v.trace_counts)
        out.compile_counts.update(v.compile_counts)
    return msg

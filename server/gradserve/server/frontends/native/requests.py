"""The native protocol's ComputeRequest as the data plane's neutral request.

Only syntax is checked here: the tensors' encoding (dtype, shape, byte length, the size limits,
before any array is built; arrays are zero-copy views of the request bytes, or of the caller's
shared-memory region for a tensor sent by reference), and wire enums that name nothing.
Everything that depends on the model or the limits of a method is checked by the data plane, for
every protocol alike (``dataplane.validation``).
"""
from __future__ import annotations

import math

import numpy as np

from gradserve import _codec, _names
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.requests import NO_ARRAYS, ComputeRequest, Selection
from gradserve.server.core.spec import (
    DEFAULT_NOISE,
    GradCamOptions,
    IntegratedGradientsOptions,
    MethodOptions,
    SmoothGradOptions,
)
from gradserve.server.frontends.native import explain
from gradserve.server.frontends.shared_memory import Borrowed
from gradserve.server.frontends.tensors import check_shape, shared_array
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["compute_request", "decode_tensor", "method_name"]


def _name(table: _names.Names, value: int, field: str) -> str:
    name = table.name(value)
    if name is None:
        raise InvalidArgumentError(f"{field}: unknown value {int(value)}")
    return name


def method_name(value: int) -> str:
    """SDK name of a wire Method; InvalidArgumentError for unknown values."""
    name = _names.METHODS.name(value)
    if name is None:
        raise InvalidArgumentError(f"method: unknown method value {int(value)}")
    return name


def decode_tensor(tensor: _tensor_pb2.Tensor, field: str, limits: Limits,
                  regions: Borrowed | None = None) -> np.ndarray:
    """One tensor as a read-only array over the message's bytes, after the size limits; or, sent
    by reference (``Tensor.shared_memory``), an array over its range of a region in ``regions``."""
    if regions is not None and tensor.HasField("shared_memory"):
        where = tensor.shared_memory
        if tensor.data:
            raise InvalidArgumentError(f"{field}: has both data and shared_memory; send one")
        try:
            element = _codec.dtype_from_wire(tensor.dtype, field)
        except _codec.TensorError as exc:
            raise InvalidArgumentError(str(exc)) from None
        return shared_array(regions, where.region, where.offset, where.byte_size, element, tensor.shape,
                            f"{field}.shared_memory", limits)
    shape = tuple(tensor.shape)
    dtype = _codec.DTYPES.get(tensor.dtype)
    if (dtype is not None and len(shape) <= limits.max_rank and min(shape, default=0) >= 0
            and max(shape, default=0) <= limits.max_elements):
        # The common case in a few C calls; anything unusual takes the checks below, which
        # say what is wrong.
        count = math.prod(shape)
        data = tensor.data  # each read of a bytes field copies it (upb): read it once
        if count <= limits.max_elements and len(data) == count * dtype.itemsize:
            return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    check_shape(tensor.shape, field, limits)
    try:
        return _codec.decode(tensor, field)
    except _codec.TensorError as exc:
        raise InvalidArgumentError(str(exc)) from None


def _integrated(ig: _pb2.IntegratedGradientsOptions) -> IntegratedGradientsOptions:
    return IntegratedGradientsOptions(steps=ig.steps,
                                      quadrature=_name(_names.QUADRATURES, ig.quadrature,
                                                       "integrated_gradients.quadrature"),
                                      return_delta=ig.return_delta)


#: Methods without options of their own (``_options`` gives None).
_PLAIN_METHODS = frozenset({"predict", "gradient", "input_x_gradient", "jacobian", "jvp", "vjp", "hvp"})


def _options(message: _pb2.ComputeRequest, method: str, decode: explain.Decode) -> MethodOptions | None:
    if method == "shap":
        return explain.shap_options(message.shap, decode)
    if method == "partial_dependence":
        return explain.partial_dependence_options(message.partial_dependence, decode)
    if method == "integrated_gradients":
        return _integrated(message.integrated_gradients)
    if method == "smoothgrad":
        sg = message.smoothgrad
        return SmoothGradOptions(
            samples=sg.samples,
            noise=sg.noise if sg.HasField("noise") else DEFAULT_NOISE,
            stdev=sg.stdev if sg.HasField("stdev") else None,
            aggregation=_name(_names.AGGREGATIONS, sg.kind, "smoothgrad.kind"),
            seed=sg.seed if sg.HasField("seed") else None,
            base_method=method_name(sg.base_method) if sg.base_method else "gradient",
            integrated=_integrated(message.integrated_gradients))
    if method == "grad_cam":
        return GradCamOptions(upsample=message.grad_cam.upsample)
    return None


#: The target of a request that names none (the method's default: the sum of the first output).
_DEFAULT_SELECTION = Selection()


#: Selections without indices by their fields (frozen, so shared): most callers send one or two.
_SELECTIONS: dict[tuple[int, int, str, int, bool], Selection] = {}
_MAX_SELECTIONS = 256


def _selection(selector: _pb2.OutputSelector) -> Selection:
    key = None
    if not selector.indices:
        key = (selector.kind, selector.transform, selector.output_name, selector.output_index, selector.use_logits)
        cached = _SELECTIONS.get(key)
        if cached is not None:
            return cached
    kind = _name(_names.TARGET_KINDS, selector.kind, "target.kind")
    transform = _name(_names.TRANSFORMS, selector.transform, "target.transform")
    selection = Selection(output=selector.output_name or selector.output_index, kind=kind,
                          indices=np.asarray(selector.indices, dtype=np.int64) if selector.indices else None,
                          transform=transform, logits=selector.use_logits)
    if key is not None and len(_SELECTIONS) < _MAX_SELECTIONS:
        _SELECTIONS[key] = selection
    return selection


def compute_request(message: _pb2.ComputeRequest, limits: Limits, nbytes: int = 0,
                    regions: Borrowed | None = None) -> ComputeRequest:
    """The neutral request of a parsed ComputeRequest (``nbytes``: its size on the wire; ``regions``:
    the call's hold on the native shared-memory regions its tensors may name)."""
    method = method_name(message.method)
    options = (_options(message, method, lambda tensor, field: decode_tensor(tensor, field, limits, regions))
               if method not in _PLAIN_METHODS else None)
    given = message.inputs
    inputs = {name: decode_tensor(given[name], f"inputs[{name[:128]!r}]", limits, regions) for name in given}
    # Fields a plain request leaves empty are not walked (each map walk costs a batch-1 call ~0.5 µs,
    # and a tuple of an empty repeated field ~0.4 µs).
    baselines = {name: decode_tensor(tensor, f"integrated_gradients.baselines[{name[:128]!r}]", limits, regions)
                 for name, tensor in message.integrated_gradients.baselines.items()
                 } if message.HasField("integrated_gradients") else NO_ARRAYS
    tangents = {name: decode_tensor(tensor, f"tangents[{name[:128]!r}]", limits, regions)
                for name, tensor in message.tangents.items()} if message.tangents else NO_ARRAYS
    cotangent = (decode_tensor(message.cotangent, "cotangent", limits, regions)
                 if message.HasField("cotangent") else None)
    background = {name: decode_tensor(tensor, f"background[{name[:128]!r}]", limits, regions)
                  for name, tensor in message.background.items()} if message.background else NO_ARRAYS
    target = _selection(message.target) if message.HasField("target") else _DEFAULT_SELECTION
    wrt = tuple(message.wrt) if message.wrt else ()
    return ComputeRequest(message.model, inputs, method, message.version, target, wrt, message.include_outputs,
                          message.layer, options, baselines, tangents, cotangent, background, message.request_id,
                          nbytes)

"""The native protocol's ComputeRequest as the data plane's neutral request.

Only syntax is checked here: the tensors' encoding (dtype, shape, byte length, the size limits,
before any array is built; arrays are zero-copy views of the request bytes), and wire enums
that name nothing. Everything that depends on the model or the limits of a method is checked by
the data plane, for every protocol alike (``dataplane.validation``).
"""
from __future__ import annotations

import numpy as np

from gradserve import _codec, _names
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.requests import ComputeRequest, Selection
from gradserve.server.core.spec import (
    DEFAULT_NOISE,
    GradCamOptions,
    IntegratedGradientsOptions,
    MethodOptions,
    SmoothGradOptions,
)
from gradserve.server.frontends.tensors import check_shape
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


def decode_tensor(tensor: _tensor_pb2.Tensor, field: str, limits: Limits) -> np.ndarray:
    """One tensor as a read-only array over the message's bytes, after the size limits."""
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


def _options(message: _pb2.ComputeRequest, method: str) -> MethodOptions | None:
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


def _selection(selector: _pb2.OutputSelector) -> Selection:
    kind = _name(_names.TARGET_KINDS, selector.kind, "target.kind")
    transform = _name(_names.TRANSFORMS, selector.transform, "target.transform")
    return Selection(output=selector.output_name or selector.output_index, kind=kind,
                     indices=np.asarray(selector.indices, dtype=np.int64) if selector.indices else None,
                     transform=transform, logits=selector.use_logits)


def compute_request(message: _pb2.ComputeRequest, limits: Limits, nbytes: int = 0) -> ComputeRequest:
    """The neutral request of a parsed ComputeRequest (``nbytes``: its size on the wire)."""
    method = method_name(message.method)
    options = _options(message, method)
    inputs = {name: decode_tensor(tensor, f"inputs[{name[:128]!r}]", limits)
              for name, tensor in message.inputs.items()}
    baselines = {name: decode_tensor(tensor, f"integrated_gradients.baselines[{name[:128]!r}]", limits)
                 for name, tensor in message.integrated_gradients.baselines.items()}
    tangents = {name: decode_tensor(tensor, f"tangents[{name[:128]!r}]", limits)
                for name, tensor in message.tangents.items()}
    cotangent = decode_tensor(message.cotangent, "cotangent", limits) if message.HasField("cotangent") else None
    return ComputeRequest(model=message.model, inputs=inputs, method=method, version=message.version,
                          target=_selection(message.target), wrt=tuple(message.wrt),
                          include_outputs=message.include_outputs, layer=message.layer, options=options,
                          baselines=baselines, tangents=tangents, cotangent=cotangent,
                          request_id=message.request_id, nbytes=nbytes)

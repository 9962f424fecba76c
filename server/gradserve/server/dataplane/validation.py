"""Turns a ComputeRequest into a ComputeSpec, checking every field against the model and limits.

Everything is checked from the message's own fields (dtype, shape, byte length) before any
array is built; arrays are zero-copy views of the request bytes. This is the only module that
reads ComputeRequest fields: wire enums become names here (one table each), the wire's 0 values
become their documented defaults, and each option is range-checked once, into the method's
frozen options object (``spec``). The method is looked up in the registry here, once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gradserve import _codec
from gradserve.server.compute import methods
from gradserve.server.config import Limits
from gradserve.server.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve.server.core.spec import (
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    ComputeSpec,
    GradCamOptions,
    IntegratedGradientsOptions,
    MethodOptions,
    SmoothGradOptions,
    TargetSpec,
)
from gradserve.server.models.modelfn import ModelFunction
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["method_name", "decode_tensor", "validate_request"]


_METHODS: dict[int, str] = {
    _pb2.METHOD_UNSPECIFIED: "gradient",
    _pb2.METHOD_PREDICT: "predict",
    _pb2.METHOD_GRADIENT: "gradient",
    _pb2.METHOD_INPUT_X_GRADIENT: "input_x_gradient",
    _pb2.METHOD_INTEGRATED_GRADIENTS: "integrated_gradients",
    _pb2.METHOD_SMOOTHGRAD: "smoothgrad",
    _pb2.METHOD_JACOBIAN: "jacobian",
    _pb2.METHOD_JVP: "jvp",
    _pb2.METHOD_VJP: "vjp",
    _pb2.METHOD_HVP: "hvp",
    _pb2.METHOD_GRAD_CAM: "grad_cam",
}
_KINDS: dict[int, str] = {_pb2.TARGET_KIND_UNSPECIFIED: "sum", _pb2.TARGET_KIND_SUM: "sum",
          _pb2.TARGET_KIND_INDEX: "index", _pb2.TARGET_KIND_ARGMAX: "argmax"}
_TRANSFORMS: dict[int, str] = {_pb2.TRANSFORM_UNSPECIFIED: "identity", _pb2.TRANSFORM_IDENTITY: "identity",
               _pb2.TRANSFORM_SOFTMAX: "softmax", _pb2.TRANSFORM_LOG_SOFTMAX: "log_softmax",
               _pb2.TRANSFORM_SIGMOID: "sigmoid"}
_QUADRATURES: dict[int, str] = {_pb2.QUADRATURE_UNSPECIFIED: "gausslegendre",
                _pb2.QUADRATURE_GAUSS_LEGENDRE: "gausslegendre",
                _pb2.QUADRATURE_RIEMANN_LEFT: "riemann_left", _pb2.QUADRATURE_RIEMANN_RIGHT: "riemann_right",
                _pb2.QUADRATURE_RIEMANN_MIDDLE: "riemann_middle",
                _pb2.QUADRATURE_RIEMANN_TRAPEZOID: "riemann_trapezoid"}
_AGGREGATIONS: dict[int, str] = {_pb2.NOISE_AGGREGATION_UNSPECIFIED: "mean", _pb2.NOISE_AGGREGATION_MEAN: "mean",
                 _pb2.NOISE_AGGREGATION_SQUARE: "square", _pb2.NOISE_AGGREGATION_VAR: "var"}
_SMOOTHGRAD_BASES = ("gradient", "input_x_gradient", "integrated_gradients")


def method_name(value: int) -> str:
    """SDK name of a wire Method; InvalidArgumentError for unknown values."""
    try:
        return _METHODS[value]
    except KeyError:
        raise InvalidArgumentError(f"method: unknown method value {int(value)}") from None


def decode_tensor(tensor: _tensor_pb2.Tensor, field: str, limits: Limits) -> np.ndarray:
    """Decode one tensor after checking rank, dimensions, element count and byte length."""
    shape = tensor.shape
    if len(shape) > limits.max_rank:
        raise InvalidArgumentError(f"{field}.shape: rank {len(shape)} exceeds the limit of {limits.max_rank}")
    for i, d in enumerate(shape):
        # Each dimension on its own: with a zero elsewhere the element count passes any limit,
        # and NumPy cannot even describe a dimension near 2**63.
        if d > limits.max_elements:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} is {d}, above the limit of "
                                       f"{limits.max_elements} elements")
    try:
        arr = _codec.decode(tensor, field, max_elements=limits.max_elements)
    except _codec.TensorError as exc:
        raise InvalidArgumentError(str(exc)) from None
    if limits.reject_nonfinite and arr.dtype.kind in "fV" and not _all_finite(arr):
        raise InvalidArgumentError(f"{field}: contains NaN or Inf (refused by --reject-nonfinite)")
    return arr


def _all_finite(arr: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether every element is finite, looked at in chunks so that the check's boolean
    temporaries stay small whatever the tensor's size."""
    flat = arr.reshape(-1)  # a view: decoded tensors are contiguous
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def _check_input(arr: np.ndarray, spec: Any, field: str) -> None:
    if arr.dtype != spec.dtype:
        raise InvalidArgumentError(f"{field}.dtype: got {arr.dtype.name}, the model expects {spec.dtype.name}")
    if arr.ndim != len(spec.shape):
        raise InvalidArgumentError(f"{field}.shape: rank {arr.ndim} {list(arr.shape)} but the model "
                                   f"expects rank {len(spec.shape)} {_show(spec.shape)}")
    for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if i > 0 and want is not None and got != want:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} is {got} but the model expects "
                                       f"{want} {_show(spec.shape)}")


def _show(shape: Any) -> list[Any]:
    return [-1 if d is None else d for d in shape]


def _target(req: _pb2.ComputeRequest, model: ModelFunction, batch: int) -> TargetSpec:
    sel = req.target
    if sel.output_name:
        names = [o.name for o in model.outputs]
        if sel.output_name not in names:
            raise NotFoundError(f"target.output_name: unknown output {sel.output_name!r}; the model's "
                                f"outputs are {names}")
        output = model.output(sel.output_name)
    else:
        if not 0 <= sel.output_index < len(model.outputs):
            raise NotFoundError(f"target.output_index: {sel.output_index} is out of range; the model "
                                f"has {len(model.outputs)} output(s)")
        output = model.outputs[sel.output_index]
    if sel.kind not in _KINDS:
        raise InvalidArgumentError(f"target.kind: unknown value {int(sel.kind)}")
    if sel.transform not in _TRANSFORMS:
        raise InvalidArgumentError(f"target.transform: unknown value {int(sel.transform)}")
    kind = _KINDS[sel.kind]
    indices = None
    if kind == "index":
        raw = np.asarray(sel.indices, dtype=np.int64)
        if raw.size not in (1, batch):
            raise InvalidArgumentError(f"target.indices: {raw.size} values; give one for all examples "
                                       f"or one per example ({batch})")
        width = output.shape[-1] if len(output.shape) > 1 else None
        if width is not None:
            bad = raw[(raw >= width) | (raw < -width)]
            if bad.size:
                raise InvalidArgumentError(f"target.indices: {int(bad[0])} is out of range for output "
                                           f"{output.name!r} with {width} entries in its last axis")
            raw = np.where(raw < 0, raw + width, raw)
        elif (raw < 0).any():
            raise InvalidArgumentError("target.indices: negative indices need an output of known width")
        indices = np.broadcast_to(raw, (batch,)).copy()
    elif sel.indices:
        raise InvalidArgumentError("target.indices: only allowed with TARGET_KIND_INDEX")
    return TargetSpec(output.name, kind, indices, _TRANSFORMS[sel.transform], sel.use_logits)


def _wrt(req: _pb2.ComputeRequest, model: ModelFunction) -> tuple[str, ...]:
    names = {s.name: s for s in model.inputs}
    if not req.wrt:
        wrt = tuple(s.name for s in model.inputs if s.differentiable)
        if not wrt and not req.layer:
            raise FailedPreconditionError("wrt: the model has no floating inputs to differentiate; "
                                          "attribute to a layer instead (layer=...)")
        return wrt
    seen: list[str] = []
    for n in req.wrt:
        if n not in names:
            raise NotFoundError(f"wrt: unknown input {n!r}; the model's inputs are {list(names)}")
        if not names[n].differentiable:
            raise FailedPreconditionError(f"wrt: input {n!r} has dtype {names[n].dtype.name} and cannot be "
                                          "differentiated; attribute to a layer instead (layer=..., e.g. "
                                          "the embedding that consumes it)")
        if n in seen:
            raise InvalidArgumentError(f"wrt: input {n!r} is listed twice")
        seen.append(n)
    return tuple(seen)


def validate_request(req: _pb2.ComputeRequest, model: ModelFunction,
                     limits: Limits) -> tuple[methods.SensitivityMethod, ComputeSpec]:
    """Check every field of ``req`` (but the model reference, which the caller resolved) against
    ``model`` and ``limits``; returns the method and the decoded spec."""
    method = method_name(req.method)
    impl = methods.get(method)
    options = _options(req, method, limits)
    expected = {s.name: s for s in model.inputs}
    if len(req.inputs) > len(expected) + 16:
        # Do not list (or even sort) thousands of unknown names: say how many there are.
        raise NotFoundError(f"inputs: {len(req.inputs)} inputs given; the model's inputs are {list(expected)}")
    for name in req.inputs:
        if name not in expected:
            raise NotFoundError(f"inputs: unknown input {name[:128]!r}; the model's inputs are "
                                f"{list(expected)}")
    for name in expected:
        if name not in req.inputs:
            raise InvalidArgumentError(f"inputs: missing input {name!r}")
    inputs: dict[str, np.ndarray] = {}
    batch = -1
    for name, want in expected.items():
        field = f"inputs[{name!r}]"
        tensor = req.inputs[name]
        if len(tensor.shape) == 0:
            raise InvalidArgumentError(f"{field}.shape: a batch dimension is required (got a scalar)")
        if len(tensor.shape) != len(want.shape) and len(tensor.shape) <= limits.max_rank:
            raise InvalidArgumentError(f"{field}.shape: rank {len(tensor.shape)} but the model expects "
                                       f"rank {len(want.shape)} {_show(want.shape)}")
        if tensor.shape[0] > limits.max_batch:
            raise InvalidArgumentError(f"{field}.shape: batch size {tensor.shape[0]} exceeds the limit of "
                                       f"{limits.max_batch}")
        arr = decode_tensor(tensor, field, limits)
        _check_input(arr, want, field)
        if batch >= 0 and arr.shape[0] != batch:
            raise InvalidArgumentError(f"{field}.shape: batch size {arr.shape[0]} differs from the other "
                                       f"inputs' {batch}")
        batch = arr.shape[0]
        inputs[name] = arr
    if batch == 0:
        raise InvalidArgumentError("inputs: the batch is empty (batch dimension 0)")
    spec = ComputeSpec(model=req.model, version=req.version, method=method, inputs=inputs,
                       batch_size=batch, include_outputs=req.include_outputs,
                       request_id=req.request_id, layer=req.layer, options=options)
    if impl.differentiates:
        spec.target = _target(req, model, batch)
        spec.wrt = _wrt(req, model)
        spec.wrt_explicit = bool(req.wrt)
    if req.HasField("integrated_gradients"):
        spec.baselines = {k: decode_tensor(v, f"integrated_gradients.baselines[{k!r}]", limits)
                          for k, v in req.integrated_gradients.baselines.items()}
    if req.tangents:
        spec.tangents = {k: decode_tensor(v, f"tangents[{k!r}]", limits) for k, v in req.tangents.items()}
    if req.HasField("cotangent"):
        spec.cotangent = decode_tensor(req.cotangent, "cotangent", limits)
    return impl, spec


def _enum(table: dict[int, str], value: int, field: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgumentError(f"{field}: unknown value {int(value)}") from None


def _count(value: int, default: int, limit: int, field: str) -> int:
    """A step or sample count: 0 is the default (as the proto documents), else within [1, limit]."""
    if value == 0:
        return default
    if not 0 < value <= limit:
        raise InvalidArgumentError(f"{field}: {value} is outside [1, {limit}] (0: the default, {default})")
    return value


def _level(value: float, field: str) -> float:
    if not (np.isfinite(value) and value >= 0):
        raise InvalidArgumentError(f"{field}: must be finite and not negative, got {value}")
    return float(value)


def _integrated(ig: _pb2.IntegratedGradientsOptions, limits: Limits) -> IntegratedGradientsOptions:
    return IntegratedGradientsOptions(
        steps=_count(ig.steps, DEFAULT_STEPS, limits.max_steps, "integrated_gradients.steps"),
        quadrature=_enum(_QUADRATURES, ig.quadrature, "integrated_gradients.quadrature"),
        return_delta=ig.return_delta)


def _options(req: _pb2.ComputeRequest, method: str, limits: Limits) -> MethodOptions | None:
    """The method's typed options, every value checked (before any tensor is decoded)."""
    ig = _integrated(req.integrated_gradients, limits)  # also SmoothGrad's base when that is IG
    if method == "integrated_gradients":
        return ig
    if method == "smoothgrad":
        sg = req.smoothgrad
        base = method_name(sg.base_method) if sg.base_method else "gradient"
        if base not in _SMOOTHGRAD_BASES:
            raise InvalidArgumentError(f"smoothgrad.base_method: expected one of {list(_SMOOTHGRAD_BASES)}, "
                                       f"got {base!r}")
        return SmoothGradOptions(
            samples=_count(sg.samples, DEFAULT_SAMPLES, limits.max_samples, "smoothgrad.samples"),
            noise=_level(sg.noise, "smoothgrad.noise") if sg.HasField("noise") else DEFAULT_NOISE,
            stdev=_level(sg.stdev, "smoothgrad.stdev") if sg.HasField("stdev") else None,
            aggregation=_enum(_AGGREGATIONS, sg.kind, "smoothgrad.kind"),
            seed=sg.seed if sg.HasField("seed") else None,
            base_method=base, integrated=ig)
    if method == "grad_cam":
        return GradCamOptions(upsample=req.grad_cam.upsample)
    return None

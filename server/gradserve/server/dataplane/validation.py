"""The one check of a neutral request against its model and the limits, for every protocol.

Front-ends have decoded the wire format (``core.requests.ComputeRequest``); here every field is
checked against the model's signature and the limits, the options get their defaults and are
range-checked, and the method is looked up in the registry, once. The result is a frozen
``core.spec.ComputeSpec``. Because every protocol meets this function, a bad value gets the same
status and message whether it came natively or through the Open Inference Protocol.

Most requests a server sees are of a few kinds: the same model, method, target, wrt and input
names, dtypes and shapes, only the batch size and the values differing. ``request_kind`` names
a plain request's kind (None for one that must be checked in full each time), and
``checked_batch`` runs what the check of such a request depends on besides its kind (the batch
sizes and limit, NaN/Inf): the data plane checks and plans the first request of a kind in full,
and the later ones of that kind with ``checked_batch`` alone. Whatever ``checked_batch`` finds
wrong, the full check is run to say what (the same status and message as always).
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Mapping

import numpy as np

from gradserve import _names
from gradserve.server.compute import methods
from gradserve.server.config import Limits
from gradserve.server.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve.server.core.models import TensorSpec
from gradserve.server.core.requests import ComputeRequest, Selection
from gradserve.server.core.spec import (
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

__all__ = ["check", "check_inputs", "check_target", "request_kind", "checked_batch", "finite_inputs"]

#: Elements looked at per step of the NaN/Inf check.
_CHUNK = 1 << 20


def _all_finite(arr: np.ndarray, chunk: int = _CHUNK) -> bool:
    """Whether every element is finite, looked at in chunks so that the check's boolean
    temporaries stay small whatever the tensor's size."""
    if arr.size <= chunk:
        return bool(np.isfinite(arr).all())
    flat = np.ascontiguousarray(arr).reshape(-1)
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def _finite(arr: np.ndarray, field: str, limits: Limits) -> None:
    if limits.reject_nonfinite and arr.dtype.kind in "fV" and not _all_finite(arr):
        raise InvalidArgumentError(f"{field}: contains NaN or Inf (refused by --reject-nonfinite)")


def _show(shape: tuple[int | None, ...]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def _check_input(arr: np.ndarray, spec: TensorSpec, field: str, limits: Limits) -> None:
    if arr.ndim == 0:
        raise InvalidArgumentError(f"{field}.shape: a batch dimension is required (got a scalar)")
    if arr.ndim != len(spec.shape):
        raise InvalidArgumentError(f"{field}.shape: rank {arr.ndim} but the model expects "
                                   f"rank {len(spec.shape)} {_show(spec.shape)}")
    if arr.shape[0] > limits.max_batch:
        raise InvalidArgumentError(f"{field}.shape: batch size {arr.shape[0]} exceeds the limit of "
                                   f"{limits.max_batch}")
    if arr.dtype != spec.dtype:
        raise InvalidArgumentError(f"{field}.dtype: got {arr.dtype.name}, the model expects {spec.dtype.name}")
    for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if i > 0 and want is not None and got != want:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} is {got} but the model expects "
                                       f"{want} {_show(spec.shape)}")
    _finite(arr, field, limits)


def check_inputs(given: Mapping[str, np.ndarray], model: ModelFunction, limits: Limits,
                 what: str = "inputs") -> tuple[dict[str, np.ndarray], int]:
    """Arrays for every model input (``what``: the request's field, e.g. "background"), checked
    against the model's signature and the limits, in the model's input order; and their batch size."""
    expected = {s.name: s for s in model.inputs}
    if len(given) > len(expected) + 16:
        # Do not list (or even sort) thousands of unknown names: say how many there are.
        raise NotFoundError(f"{what}: {len(given)} inputs given; the model's inputs are {list(expected)}")
    for name in given:
        if name not in expected:
            raise NotFoundError(f"{what}: unknown input {name[:128]!r}; the model's inputs are {list(expected)}")
    for name in expected:
        if name not in given:
            raise InvalidArgumentError(f"{what}: missing input {name!r}")
    batch = -1
    for name, spec in expected.items():
        arr = given[name]
        field = f"{what}[{name!r}]"
        _check_input(arr, spec, field, limits)
        if batch >= 0 and arr.shape[0] != batch:
            raise InvalidArgumentError(f"{field}.shape: batch size {arr.shape[0]} differs from the other "
                                       f"inputs' {batch}")
        batch = arr.shape[0]
    if batch == 0:
        raise InvalidArgumentError(f"{what}: the batch is empty (batch dimension 0)")
    return {name: given[name] for name in expected}, batch


def check_target(sel: Selection, model: ModelFunction, batch: int) -> TargetSpec:
    """The target resolved against the model's outputs, its indices checked (one per example)."""
    if isinstance(sel.output, str) and sel.output:
        names = [o.name for o in model.outputs]
        if sel.output not in names:
            raise NotFoundError(f"target.output_name: unknown output {sel.output!r}; the model's "
                                f"outputs are {names}")
        output = model.output(sel.output)
    else:
        index = int(sel.output or 0)
        if not 0 <= index < len(model.outputs):
            raise NotFoundError(f"target.output_index: {index} is out of range; the model "
                                f"has {len(model.outputs)} output(s)")
        output = model.outputs[index]
    indices = None
    if sel.kind == "index":
        raw = np.asarray(() if sel.indices is None else sel.indices, dtype=np.int64).reshape(-1)
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
    elif sel.indices is not None and len(sel.indices):
        raise InvalidArgumentError("target.indices: only allowed with TARGET_KIND_INDEX")
    return TargetSpec(output.name, sel.kind, indices, sel.transform, sel.logits)


def _wrt(request: ComputeRequest, model: ModelFunction) -> tuple[str, ...]:
    names = {s.name: s for s in model.inputs}
    if not request.wrt:
        wrt = tuple(s.name for s in model.inputs if s.differentiable)
        if not wrt and not request.layer:
            raise FailedPreconditionError("wrt: the model has no floating inputs to differentiate; "
                                          "attribute to a layer instead (layer=...)")
        return wrt
    seen: list[str] = []
    for n in request.wrt:
        if n not in names:
            raise NotFoundError(f"wrt: unknown input {n[:128]!r}; the model's inputs are {list(names)}")
        if not names[n].differentiable:
            raise FailedPreconditionError(f"wrt: input {n!r} has dtype {names[n].dtype.name} and cannot be "
                                          "differentiated; attribute to a layer instead (layer=..., e.g. "
                                          "the embedding that consumes it)")
        if n in seen:
            raise InvalidArgumentError(f"wrt: input {n!r} is listed twice")
        seen.append(n)
    return tuple(seen)


def _count(value: int, default: int, limit: int, field: str) -> int:
    """A step or sample count: 0 is the default (as the wire documents), else within [1, limit]."""
    if value == 0:
        return default
    if not 0 < value <= limit:
        raise InvalidArgumentError(f"{field}: {value} is outside [1, {limit}] (0: the default, {default})")
    return value


def _level(value: float, field: str) -> float:
    if not (np.isfinite(value) and value >= 0):
        raise InvalidArgumentError(f"{field}: must be finite and not negative, got {value}")
    return float(value)


def _integrated(opts: IntegratedGradientsOptions, limits: Limits) -> IntegratedGradientsOptions:
    return dataclasses.replace(opts, steps=_count(opts.steps, DEFAULT_STEPS, limits.max_steps,
                                                  "integrated_gradients.steps"))


def _options(request: ComputeRequest, limits: Limits) -> MethodOptions | None:
    """The method's options with their defaults, every value checked."""
    opts, method = request.options, request.method
    if method == "integrated_gradients":
        return _integrated(opts if isinstance(opts, IntegratedGradientsOptions) else IntegratedGradientsOptions(0),
                           limits)
    if method == "smoothgrad":
        sg = opts if isinstance(opts, SmoothGradOptions) else SmoothGradOptions(0)
        if sg.base_method not in _names.SMOOTHGRAD_BASES:
            raise InvalidArgumentError(f"smoothgrad.base_method: expected one of {list(_names.SMOOTHGRAD_BASES)}, "
                                       f"got {sg.base_method!r}")
        if sg.aggregation not in _names.AGGREGATIONS:
            raise InvalidArgumentError(f"smoothgrad.kind: expected one of {list(_names.AGGREGATIONS)}, "
                                       f"got {sg.aggregation!r}")
        return dataclasses.replace(
            sg, samples=_count(sg.samples, DEFAULT_SAMPLES, limits.max_samples, "smoothgrad.samples"),
            noise=_level(sg.noise, "smoothgrad.noise"),
            stdev=None if sg.stdev is None else _level(sg.stdev, "smoothgrad.stdev"),
            integrated=_integrated(sg.integrated, limits))
    if method == "grad_cam":
        return opts if isinstance(opts, GradCamOptions) else GradCamOptions()
    return None


def check(request: ComputeRequest, model: ModelFunction,
          limits: Limits) -> tuple[methods.SensitivityMethod, ComputeSpec]:
    """Check every field of ``request`` (but the model reference, which the caller resolved)
    against ``model`` and ``limits``; returns the method and the checked spec."""
    impl = methods.get(request.method)
    options = _options(request, limits)
    inputs, batch = check_inputs(request.inputs, model, limits)
    for name, arr in request.baselines.items():
        _finite(arr, f"integrated_gradients.baselines[{name[:128]!r}]", limits)
    for name, arr in request.tangents.items():
        _finite(arr, f"tangents[{name[:128]!r}]", limits)
    if request.cotangent is not None:
        _finite(request.cotangent, "cotangent", limits)
    target: TargetSpec | None = None
    wrt: tuple[str, ...] = ()
    if impl.differentiates:
        target = check_target(request.target, model, batch)
        wrt = _wrt(request, model)
    # The request's own arrays and mappings are handed through (both are immutable records).
    return impl, ComputeSpec(request.model, request.version, request.method, inputs, batch, target, wrt,
                             bool(request.wrt), request.include_outputs, request.request_id, request.layer, options,
                             request.baselines, request.tangents, request.cotangent)


def request_kind(request: ComputeRequest) -> Hashable | None:
    """What a plain request's check and plan depend on, but for its batch size and values: its
    method, target, wrt, layer, include_outputs and every input's name, dtype and shape less the
    batch (in the request's order). None for a request with options, baselines, tangents, a
    cotangent, a background or target indices, whose check depends on more (it is checked in
    full each time). Requests of one kind on one model version pass or fail the check alike
    whenever ``checked_batch`` accepts them (see the module docstring)."""
    if (request.options is not None or request.baselines or request.tangents or request.cotangent is not None
            or request.background or request.target.indices is not None):
        return None
    try:
        arrays = tuple([(name, arr.dtype, arr.shape[1:]) for name, arr in request.inputs.items()])
    except AttributeError:  # not NumPy arrays: the full check says what is wrong
        return None
    return (request.method, request.target, request.wrt, request.layer, request.include_outputs, arrays)


def finite_inputs(model: ModelFunction) -> tuple[str, ...]:
    """The inputs of ``model`` whose values the NaN/Inf check looks at (floating and void dtypes)."""
    return tuple(s.name for s in model.inputs if s.dtype.kind in "fV")


def checked_batch(request: ComputeRequest, finite: tuple[str, ...], limits: Limits) -> int:
    """The batch size of a request of a kind whose first request passed ``check`` (see
    ``request_kind``), after the checks that depend on more than its kind: every input has the
    same batch size, within [1, ``max_batch``], and (with ``reject_nonfinite``) the ``finite``
    inputs hold no NaN or Inf. -1 when any of them fails: run ``check`` to say which."""
    batch = -1
    for arr in request.inputs.values():
        shape = arr.shape
        if not shape or (batch >= 0 and shape[0] != batch):
            return -1
        batch = shape[0]
    if not 0 < batch <= limits.max_batch:
        return -1
    if limits.reject_nonfinite:
        inputs = request.inputs
        for name in finite:
            if not _all_finite(inputs[name]):
                return -1
    return int(batch)

"""Builds ComputeRequests from SDK arguments and turns ComputeResponses back into NumPy.

The wire format is written here once; ``Client`` and ``AsyncClient`` only add I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gradserve import _codec
from gradserve._exceptions import InvalidArgument, from_status
from gradserve._models import ModelInfo, PreparedInputs, mirror, prepare_inputs
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["ComputeResult", "Call", "build_call", "decode_response", "METHODS", "Target"]

#: SDK method name -> wire Method.
METHODS: Mapping[str, int] = {
    "predict": _pb2.METHOD_PREDICT,
    "gradient": _pb2.METHOD_GRADIENT,
    "input_x_gradient": _pb2.METHOD_INPUT_X_GRADIENT,
    "integrated_gradients": _pb2.METHOD_INTEGRATED_GRADIENTS,
    "smoothgrad": _pb2.METHOD_SMOOTHGRAD,
    "jacobian": _pb2.METHOD_JACOBIAN,
    "jvp": _pb2.METHOD_JVP,
    "vjp": _pb2.METHOD_VJP,
    "hvp": _pb2.METHOD_HVP,
    "grad_cam": _pb2.METHOD_GRAD_CAM,
}
_QUADRATURES = {
    "gausslegendre": _pb2.QUADRATURE_GAUSS_LEGENDRE,
    "riemann_left": _pb2.QUADRATURE_RIEMANN_LEFT,
    "riemann_right": _pb2.QUADRATURE_RIEMANN_RIGHT,
    "riemann_middle": _pb2.QUADRATURE_RIEMANN_MIDDLE,
    "riemann_trapezoid": _pb2.QUADRATURE_RIEMANN_TRAPEZOID,
}
_TRANSFORMS = {
    None: _pb2.TRANSFORM_IDENTITY, "identity": _pb2.TRANSFORM_IDENTITY,
    "softmax": _pb2.TRANSFORM_SOFTMAX, "log_softmax": _pb2.TRANSFORM_LOG_SOFTMAX,
    "sigmoid": _pb2.TRANSFORM_SIGMOID,
}
_AGGREGATIONS = {"mean": _pb2.NOISE_AGGREGATION_MEAN, "square": _pb2.NOISE_AGGREGATION_SQUARE,
                 "var": _pb2.NOISE_AGGREGATION_VAR}

#: None (sum per example), an int, a sequence of ints (one per example) or "argmax".
Target = int | Sequence[int] | str | None


@dataclass
class ComputeResult:
    """Everything a ComputeResponse carries, decoded to NumPy."""

    model: str
    version: int
    request_id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    target_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Call:
    """A request ready to send, and how to shape its answer for the caller."""

    request: _pb2.ComputeRequest
    finish: Callable[[ComputeResult], Any]


def decode_response(resp: _pb2.ComputeResponse) -> ComputeResult:
    """Decode a response; an in-band error (streams) is raised as its SDK exception."""
    if resp.HasField("error") and resp.error.code != 0:
        raise from_status(resp.error.code, resp.error.message)
    return ComputeResult(
        model=resp.model, version=resp.version, request_id=resp.request_id,
        outputs=_codec.decode_map(resp.outputs, "outputs"),
        attributions=_codec.decode_map(resp.attributions, "attributions"),
        extras=_codec.decode_map(resp.extras, "extras"),
        target_indices=np.asarray(resp.target_indices, dtype=np.int64),
    )


def _selector(msg: _pb2.OutputSelector, target: Target, output: str | int | None,
              transform: str | None, logits: bool) -> None:
    if isinstance(output, str):
        msg.output_name = output
    elif output is not None:
        msg.output_index = int(output)
    if target is None:
        msg.kind = _pb2.TARGET_KIND_SUM
    elif isinstance(target, str):
        if target != "argmax":
            raise InvalidArgument(f"target: expected None, an int, a sequence of ints or 'argmax', got {target!r}")
        msg.kind = _pb2.TARGET_KIND_ARGMAX
    else:
        idx = np.asarray(target)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise InvalidArgument("target: expected an int or a 1-D sequence of ints")
        msg.kind = _pb2.TARGET_KIND_INDEX
        msg.indices.extend(int(i) for i in idx.reshape(-1))
    if transform not in _TRANSFORMS:
        raise InvalidArgument(f"transform: expected one of {sorted(k for k in _TRANSFORMS if k)}, got {transform!r}")
    msg.transform = _TRANSFORMS[transform]
    msg.use_logits = bool(logits)


def _per_input(value: Any, prepared: PreparedInputs, field: str) -> dict[str, np.ndarray]:
    """Baselines/tangents given like the inputs (array, list or dict) -> dict by input name."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): np.asarray(v) for k, v in value.items()}
    if prepared.structure == "list":
        if not isinstance(value, (list, tuple)) or len(value) != len(prepared.order):
            raise InvalidArgument(f"{field}: pass one per input, as a list in input order or a dict")
        return {n: np.asarray(v) for n, v in zip(prepared.order, value)}
    if prepared.structure == "dict" and len(prepared.order) > 1 and np.ndim(value) > 0:
        raise InvalidArgument(f"{field}: pass a dict by input name for a multi-input model")
    return {n: np.asarray(value) for n in prepared.order}


def build_call(info: ModelInfo | None, model: str, method: str, inputs: Any, *,
               version: int = 0, target: Target = None, output: str | int | None = None,
               transform: str | None = None, logits: bool = False, wrt: Sequence[str] | None = None,
               return_outputs: bool = False, request_id: str = "", layer: str | None = None,
               baseline: Any = 0.0, steps: int = 50, quadrature: str = "gausslegendre",
               return_delta: bool = False, samples: int = 50, noise: float | None = None,
               stdev: float | None = None, kind: str = "mean", seed: int | None = None,
               base_method: str = "gradient", tangents: Any = None, cotangents: Any = None,
               upsample: bool = False) -> Call:
    """Validate SDK arguments and build the request for ``method`` plus its result shaper."""
    if method not in METHODS:
        raise InvalidArgument(f"method: unknown method {method!r}; expected one of {sorted(METHODS)}")
    specs = info.inputs if info is not None else ()
    prepared = prepare_inputs(inputs, specs)
    req = _pb2.ComputeRequest(model=model, version=int(version), method=METHODS[method],  # type: ignore[arg-type]
                              include_outputs=bool(return_outputs), request_id=request_id)
    _codec.encode_map(prepared.arrays, req.inputs, "inputs")
    if method != "predict":
        _selector(req.target, target, output, transform, logits)
    if wrt:
        req.wrt.extend(wrt)
    if layer:
        req.layer = layer
    ig = method == "integrated_gradients" or (method == "smoothgrad" and base_method == "integrated_gradients")
    if ig:
        if quadrature not in _QUADRATURES:
            raise InvalidArgument(f"method: unknown quadrature {quadrature!r}; expected one of {sorted(_QUADRATURES)}")
        opts = req.integrated_gradients
        opts.steps = int(steps)
        opts.quadrature = _QUADRATURES[quadrature]
        opts.return_delta = bool(return_delta)
        _codec.encode_map(_per_input(baseline, prepared, "baseline"), opts.baselines, "baseline")
    if method == "smoothgrad":
        if kind not in _AGGREGATIONS:
            raise InvalidArgument(f"kind: expected one of {sorted(_AGGREGATIONS)}, got {kind!r}")
        if base_method not in ("gradient", "input_x_gradient", "integrated_gradients"):
            raise InvalidArgument(f"base_method: expected gradient, input_x_gradient or "
                                  f"integrated_gradients, got {base_method!r}")
        sg = req.smoothgrad
        sg.samples = int(samples)
        sg.kind = _AGGREGATIONS[kind]
        sg.base_method = METHODS[base_method]  # type: ignore[assignment]
        if noise is not None:
            sg.noise = float(noise)
        if stdev is not None:
            sg.stdev = float(stdev)
        if seed is not None:
            sg.seed = int(seed)
    if method in ("jvp", "hvp"):
        if tangents is None:
            raise InvalidArgument("tangents: required for jvp and hvp")
        _codec.encode_map(_per_input(tangents, prepared, "tangents"), req.tangents, "tangents")
    if method == "vjp":
        if cotangents is None:
            raise InvalidArgument("cotangents: required for vjp")
        _codec.encode(cotangents, "cotangent", out=req.cotangent)
    if method == "grad_cam":
        req.grad_cam.upsample = bool(upsample)

    def finish(result: ComputeResult) -> Any:
        outputs = _mirror_outputs(result.outputs, info)
        if method == "predict":
            return outputs
        if method in ("jvp",) or method == "grad_cam":
            # One result per selected output (jvp) or per layer map (grad_cam): not per input.
            main: Any = next(iter(result.attributions.values())) if len(result.attributions) == 1 \
                else dict(result.attributions)
        else:
            main = mirror(result.attributions, prepared)
        extra: tuple[Any, ...] = ()
        if method == "integrated_gradients" and return_delta:
            extra = (result.extras.get("delta"),)
        if return_outputs:
            return (outputs, main) + extra
        return (main,) + extra if extra else main

    return Call(req, finish)


def _mirror_outputs(outputs: dict[str, np.ndarray], info: ModelInfo | None) -> Any:
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    if info is not None and info.outputs:
        return {o.name: outputs[o.name] for o in info.outputs if o.name in outputs}
    return outputs

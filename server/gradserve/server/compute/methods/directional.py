"""Directional derivatives: Jacobian-vector (forward mode), vector-Jacobian and Hessian-vector products.

- ``jvp``: ``J v`` of the selected output head (after its transform) along ``tangents`` (one per
  input, shaped like it); the result is shaped like the head, keyed by the output's name.
- ``vjp``: ``u^T J`` for a ``cotangent`` shaped like the head; one result per wrt input.
- ``hvp``: ``H v`` of the selected scalar target, forward-over-backward (a ForwardAccumulator
  around a GradientTape); one result per input.

Each is one compiled call; no Jacobian or Hessian is ever materialised.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.gradient import GradientKey, feed_of, gradients_or_zeros, target_array, target_of
from gradserve.server.compute.methods.layers import check_model_options, forward
from gradserve.server.compute.methods.targets import apply_transform, select_target
from gradserve.server.config import Limits
from gradserve.server.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve.server.core.spec import ATTRIBUTION, INPUT, OUTPUT, TARGET_INDICES, ComputeSpec, PreparedCall, TargetKey
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["JVP", "VJP", "HVP", "DirectionKey", "direction_arrays"]


class DirectionKey(NamedTuple):
    method: str
    target: TargetKey
    #: The inputs that the tangents move.
    names: tuple[str, ...]
    include_outputs: bool

TANGENT = "tangent/"
COTANGENT = "cotangent"


def _like(value: Any, shape: tuple[int, ...], dtype: np.dtype[Any], field: str, what: str) -> np.ndarray:
    """``value`` broadcast to ``shape`` (one per example, or broadcastable to one example)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"{field}: dtype {arr.dtype.name} is not numeric")
    try:
        ok = np.broadcast_shapes(arr.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgumentError(f"{field}: shape {list(arr.shape)} does not match {what} {list(shape)} "
                                   f"(or one example of it, {list(shape[1:])})")
    return np.ascontiguousarray(np.broadcast_to(arr.astype(dtype), shape))


def direction_arrays(spec: ComputeSpec, model: ModelFunction) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """The inputs that ``tangents`` move and their batched ``tangent/<name>`` arrays.

    With an explicit wrt every wrt input needs a tangent and no other may have one; otherwise the
    tangents' names pick the inputs (each must be a floating model input).
    """
    tangents: Mapping[str, np.ndarray] = spec.tangents
    if not tangents:
        raise InvalidArgumentError(f"tangents: required for {spec.method}, one per input, shaped like it")
    specs = {s.name: s for s in model.inputs}
    for n in tangents:
        if n not in specs:
            raise NotFoundError(f"tangents: unknown input {n!r}; the model's inputs are {list(specs)}")
    if spec.wrt_explicit:
        for n in tangents:
            if n not in spec.wrt:
                raise InvalidArgumentError(f"tangents[{n!r}]: input {n!r} is not in wrt {list(spec.wrt)}")
        missing = [n for n in spec.wrt if n not in tangents]
        if missing:
            raise InvalidArgumentError(f"tangents: missing a tangent for wrt input {missing[0]!r}")
        names = tuple(spec.wrt)
    else:
        for n in tangents:
            if not specs[n].differentiable:
                raise FailedPreconditionError(f"tangents[{n!r}]: input {n!r} has dtype {specs[n].dtype.name} "
                                              "and cannot be differentiated")
        names = tuple(s.name for s in model.inputs if s.name in tangents)
    arrays = {TANGENT + n: _like(tangents[n], spec.inputs[n].shape, spec.inputs[n].dtype, f"tangents[{n!r}]",
                                 f"input {n!r}") for n in names}
    return names, arrays


def _no_layer(spec: ComputeSpec) -> None:
    if spec.layer:
        raise InvalidArgumentError(f"layer: {spec.method} differentiates inputs; layer is not supported")


@register
class JVP(SensitivityMethod):
    """Forward-mode J v of the selected output head."""

    name = "jvp"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        _no_layer(spec)
        check_model_options(spec, model)
        names, arrays = direction_arrays(spec, model)
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        batched.update(arrays)
        return PreparedCall(DirectionKey(self.name, target_of(spec), names, spec.include_outputs), batched)

    def build(self, model: ModelFunction, key: DirectionKey) -> CompiledBody:
        target, names, include_outputs = key.target, key.names, key.include_outputs

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            primals = [feed[n] for n in names]
            with tf.autodiff.ForwardAccumulator(primals, [batched[TANGENT + n] for n in names]) as acc:
                fwd = forward(model, feed, target)
                head = apply_transform(fwd.head, target.transform)
            result = {ATTRIBUTION + target.output: acc.jvp(head, unconnected_gradients=tf.UnconnectedGradients.ZERO)}
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fwd.outputs.items()})
            return result
        return body


@register
class VJP(SensitivityMethod):
    """Reverse-mode u^T J of the selected output head."""

    name = "vjp"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        _no_layer(spec)
        check_model_options(spec, model)
        assert spec.target is not None
        out = model.output(spec.target.output)
        cot = spec.cotangent
        if cot is None:
            raise InvalidArgumentError("cotangent: required for vjp, shaped like the selected output")
        if len(out.shape) != np.ndim(cot) and len(out.shape) - 1 != np.ndim(cot):
            shown = [-1 if d is None else d for d in out.shape]
            raise InvalidArgumentError(f"cotangent: rank {np.ndim(cot)} {list(np.shape(cot))} but output "
                                       f"{out.name!r} has rank {len(out.shape)} {shown}")
        # Free dimensions of the output take the cotangent's own size.
        free = np.shape(cot)[-(len(out.shape) - 1):] if len(out.shape) > 1 else ()
        shape = (spec.batch_size,) + tuple(d if d is not None else int(f) for d, f in zip(out.shape[1:], free))
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        batched[COTANGENT] = _like(cot, shape, out.dtype, "cotangent", f"output {out.name!r}")
        return PreparedCall(GradientKey(self.name, target_of(spec), spec.wrt, spec.wrt_explicit,
                                        spec.include_outputs, ""), batched)

    def build(self, model: ModelFunction, key: GradientKey) -> CompiledBody:
        target, wrt, explicit, include_outputs = key.target, key.wrt, key.explicit, key.include_outputs

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            xs = [feed[n] for n in wrt]
            with tf.GradientTape() as tape:
                tape.watch(xs)
                fwd = forward(model, feed, target)
                head = apply_transform(fwd.head, target.transform)
            grads = tape.gradient(head, xs, output_gradients=tf.cast(batched[COTANGENT], head.dtype))
            grads = gradients_or_zeros(grads, xs, wrt, explicit, target.output)
            result = {ATTRIBUTION + n: g for n, g in zip(wrt, grads)}
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fwd.outputs.items()})
            return result
        return body


@register
class HVP(SensitivityMethod):
    """Forward-over-backward H v of the selected scalar target."""

    name = "hvp"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        _no_layer(spec)
        check_model_options(spec, model)
        names, arrays = direction_arrays(spec, model)
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        batched.update(arrays)
        batched["target"] = target_array(spec)
        return PreparedCall(DirectionKey(self.name, target_of(spec), names, spec.include_outputs), batched)

    def build(self, model: ModelFunction, key: DirectionKey) -> CompiledBody:
        target, names, include_outputs = key.target, key.names, key.include_outputs
        zero = tf.UnconnectedGradients.ZERO

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            xs = [feed[n] for n in names]
            with tf.autodiff.ForwardAccumulator(xs, [batched[TANGENT + n] for n in names]) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(xs)
                    fwd = forward(model, feed, target)
                    y, idx = select_target(fwd.head, target, batched["target"])
                    total = tf.reduce_sum(y)
                grads = tape.gradient(total, xs, unconnected_gradients=zero)
            result = {TARGET_INDICES: idx}
            for n, g in zip(names, grads):
                result[ATTRIBUTION + n] = acc.jvp(g, unconnected_gradients=zero)
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fwd.outputs.items()})
            return result
        return body

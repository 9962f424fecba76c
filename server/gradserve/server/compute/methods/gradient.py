"""Forward pass, gradient and input x gradient: one pass of the model under a gradient tape."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.layers import check_model_options, forward
from gradserve.server.compute.methods.targets import select_target
from gradserve.server.config import Limits
from gradserve.server.core.errors import FailedPreconditionError
from gradserve.server.core.spec import ATTRIBUTION, INPUT, OUTPUT, TARGET_INDICES, ComputeSpec, PreparedCall, TargetKey
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["Predict", "Gradient", "InputXGradient", "PredictKey", "GradientKey", "feed_of", "target_array",
           "target_of", "gradients_or_zeros"]


class PredictKey(NamedTuple):
    method: str


class GradientKey(NamedTuple):
    method: str
    target: TargetKey
    wrt: tuple[str, ...]
    #: Whether the caller named wrt (an unconnected input is then an error, not zeros).
    explicit: bool
    include_outputs: bool
    layer: str


def feed_of(model: ModelFunction, batched: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The model's inputs out of a flat batched dict."""
    return {s.name: batched[INPUT + s.name] for s in model.inputs}


def target_array(spec: ComputeSpec) -> np.ndarray:
    """Per-example target indices to send to the compiled function (zeros when unused)."""
    t = spec.target
    if t is not None and t.indices is not None:
        return np.asarray(t.indices, np.int64)
    return np.zeros(spec.batch_size, np.int64)


def target_of(spec: ComputeSpec) -> TargetKey:
    """The static part of the request's target (differentiating methods always have one)."""
    assert spec.target is not None
    return spec.target.key


def not_connected(output: str, name: str) -> FailedPreconditionError:
    return FailedPreconditionError(f"wrt: the target of output {output!r} does not depend on input "
                                   f"{name!r} (unconnected gradient)")


def gradients_or_zeros(grads: Sequence[tf.Tensor | None], sources: Sequence[tf.Tensor],
                       names: Sequence[str], explicit: bool, output: str) -> list[tf.Tensor]:
    """Replace unconnected (None) gradients by zeros; FAILED_PRECONDITION instead when the caller
    named that input in ``wrt`` (``explicit``): with the default wrt (every floating input), an
    input the target ignores simply has a zero gradient."""
    out = []
    for name, g, x in zip(names, grads, sources):
        if g is None:
            if explicit:
                raise not_connected(output, name)
            g = tf.zeros_like(x)
        out.append(g)
    return out


@register
class Predict(SensitivityMethod):
    """Model outputs only."""

    name = "predict"
    differentiates = False
    rebinds = True

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        return PreparedCall(PredictKey(self.name), {INPUT + n: a for n, a in spec.inputs.items()})

    def rebind(self, call: PreparedCall, inputs: Mapping[str, np.ndarray], batch: int) -> PreparedCall:
        return PreparedCall(call.key, {INPUT + n: a for n, a in inputs.items()}, struct=call.struct)

    def build(self, model: ModelFunction, key: PredictKey) -> CompiledBody:
        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            outputs = model.call(feed_of(model, batched))
            return {OUTPUT + k: v for k, v in outputs.items()}
        return body


@register
class Gradient(SensitivityMethod):
    """d target / d input; outputs (include_outputs) come from the same forward pass."""

    name = "gradient"
    multiply_by_input = False
    rebinds = True

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        check_model_options(spec, model)
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        batched["target"] = target_array(spec)
        wrt = () if spec.layer else spec.wrt
        return PreparedCall(GradientKey(self.name, target_of(spec), wrt, spec.wrt_explicit, spec.include_outputs,
                                        spec.layer), batched)

    def rebind(self, call: PreparedCall, inputs: Mapping[str, np.ndarray], batch: int) -> PreparedCall:
        # A plain request's target has no indices: the compiled function's are zeros (unused).
        batched = {INPUT + n: a for n, a in inputs.items()}
        batched["target"] = np.zeros(batch, np.int64)
        return PreparedCall(call.key, batched, struct=call.struct)

    def build(self, model: ModelFunction, key: GradientKey) -> CompiledBody:
        target, wrt, explicit, include_outputs, layer = (key.target, key.wrt, key.explicit, key.include_outputs,
                                                         key.layer)
        multiply = self.multiply_by_input

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            xs = [feed[n] for n in wrt]
            with tf.GradientTape() as tape:
                tape.watch(xs)
                fwd = forward(model, feed, target, layer=layer, watch=tape.watch)
                outputs = fwd.outputs
                y, idx = select_target(fwd.head, target, batched["target"])
                total = tf.reduce_sum(y)
            result = {TARGET_INDICES: idx}
            if layer:
                a = fwd.layer
                g = tape.gradient(total, a, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                result[ATTRIBUTION + layer] = g * a if multiply else g
                if include_outputs:
                    result.update({OUTPUT + k: v for k, v in outputs.items()})
                return result
            grads = gradients_or_zeros(tape.gradient(total, xs), xs, wrt, explicit, target.output)
            for n, g in zip(wrt, grads):
                result[ATTRIBUTION + n] = g * feed[n] if multiply else g
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in outputs.items()})
            return result
        return body


@register
class InputXGradient(Gradient):
    """input * d target / d input."""

    name = "input_x_gradient"
    multiply_by_input = True

"""Per-example Jacobian of the selected output with respect to each wrt input, in one compiled call.

The result for input ``x`` has shape ``(batch, *output_shape, *input_shape)``: row ``b`` is the
Jacobian of example ``b``'s output with respect to example ``b``'s input (``batch_jacobian``,
vectorized with pfor), which assumes examples do not interact (true of inference-mode models).
The size is checked against ``Limits.max_jacobian_elements`` before anything is computed.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.gradient import GradientKey, feed_of, not_connected, target_of
from gradserve.server.compute.methods.layers import check_model_options, forward
from gradserve.server.compute.methods.targets import apply_transform
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.spec import ATTRIBUTION, INPUT, OUTPUT, ComputeSpec, PreparedCall
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["Jacobian", "jacobian_elements"]


def jacobian_elements(spec: ComputeSpec, model: ModelFunction) -> int:
    """Elements of the answer: batch x |output| x sum of |input| (unknown output dims count as 1)."""
    assert spec.target is not None
    out = int(np.prod([d or 1 for d in model.output(spec.target.output).shape[1:]], dtype=np.int64))
    ins = sum(int(np.prod(spec.inputs[n].shape[1:], dtype=np.int64)) for n in spec.wrt)
    return spec.batch_size * out * ins


@register
class Jacobian(SensitivityMethod):
    """d output / d input per example: (batch, *output_shape, *input_shape)."""

    name = "jacobian"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        if spec.layer:
            raise InvalidArgumentError("layer: jacobian differentiates inputs; layer is not supported")
        check_model_options(spec, model)
        size = jacobian_elements(spec, model)
        if size > limits.max_jacobian_elements:
            raise InvalidArgumentError(f"jacobian: the answer would have {size} elements (batch x output x input), "
                                       f"above the limit of {limits.max_jacobian_elements}; send fewer examples "
                                       "or fewer wrt inputs")
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        return PreparedCall(GradientKey(self.name, target_of(spec), spec.wrt, spec.wrt_explicit,
                                        spec.include_outputs, ""), batched)

    def build(self, model: ModelFunction, key: GradientKey) -> CompiledBody:
        target, wrt, include_outputs = key.target, key.wrt, key.include_outputs
        unconnected = tf.UnconnectedGradients.NONE if key.explicit else tf.UnconnectedGradients.ZERO

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            xs = [feed[n] for n in wrt]
            with tf.GradientTape(persistent=len(xs) > 1) as tape:
                tape.watch(xs)
                fwd = forward(model, feed, target)
                head = apply_transform(fwd.head, target.transform)
                flat = tf.reshape(head, [tf.shape(head)[0], -1])  # batch_jacobian needs rank >= 2
            result = {}
            for n, x in zip(wrt, xs):
                j = tape.batch_jacobian(flat, x, unconnected_gradients=unconnected)
                if j is None:
                    raise not_connected(target.output, n)
                shape = tf.concat([tf.shape(head), tf.shape(x)[1:]], 0)
                result[ATTRIBUTION + n] = tf.reshape(j, shape)
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fwd.outputs.items()})
            return result
        return body

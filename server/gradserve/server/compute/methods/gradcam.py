"""Grad-CAM: class activation map of a convolutional feature layer, weighted by pooled gradients.

For feature maps ``A`` (batch, h, w, channels) of ``layer`` and target ``y``, the map is
``ReLU(sum_c alpha_c A_c)`` with ``alpha_c = mean_{h,w} dy/dA_c`` (Selvaraju et al.), shape
(batch, h, w); with ``upsample`` it is resized bilinearly to the spatial size of the model's
first 4-D input. Channels-last layouts only (the Keras default).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.gradient import feed_of, target_array, target_of
from gradserve.server.compute.methods.layers import check_model_options, default_cam_layer, find_layer, forward
from gradserve.server.compute.methods.targets import select_target
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.spec import (
    ATTRIBUTION,
    INPUT,
    OUTPUT,
    TARGET_INDICES,
    ComputeSpec,
    GradCamOptions,
    PreparedCall,
    TargetKey,
)
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["GradCam", "GradCamKey"]


class GradCamKey(NamedTuple):
    method: str
    target: TargetKey
    layer: str
    #: The 4-D input whose spatial size the map is resized to ("": not resized).
    image: str
    include_outputs: bool


@register
class GradCam(SensitivityMethod):
    """Grad-CAM map of one 4-D layer output, ReLU applied, optionally upsampled."""

    name = "grad_cam"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        layer_name = spec.layer or default_cam_layer(model)
        layer = find_layer(model, layer_name)
        rank = len(layer.output.shape)
        if rank != 4:
            raise InvalidArgumentError(f"layer: Grad-CAM needs a layer with a 4-D output (batch, h, w, channels); "
                                       f"{layer_name!r} has rank {rank}")
        check_model_options(spec, model)
        image = ""
        if isinstance(spec.options, GradCamOptions) and spec.options.upsample:
            image = next((s.name for s in model.inputs if len(s.shape) == 4), "")
            if not image:
                raise InvalidArgumentError("grad_cam.upsample: the model has no 4-D input to take the size from")
        batched = {INPUT + n: a for n, a in spec.inputs.items()}
        batched["target"] = target_array(spec)
        return PreparedCall(GradCamKey(self.name, target_of(spec), layer_name, image, spec.include_outputs), batched)

    def build(self, model: ModelFunction, key: GradCamKey) -> CompiledBody:
        target, layer, image, include_outputs = key.target, key.layer, key.image, key.include_outputs

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            with tf.GradientTape() as tape:
                fwd = forward(model, feed, target, layer=layer, watch=tape.watch)
                y, idx = select_target(fwd.head, target, batched["target"])
                total = tf.reduce_sum(y)
            maps = fwd.layer
            grads = tape.gradient(total, maps, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            alpha = tf.reduce_mean(grads, axis=[1, 2])                       # (batch, channels)
            cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", maps, alpha))
            if image:
                size = tf.shape(feed[image])[1:3]
                cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
            result = {TARGET_INDICES: idx, ATTRIBUTION + layer: cam}
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fwd.outputs.items()})
            return result
        return body

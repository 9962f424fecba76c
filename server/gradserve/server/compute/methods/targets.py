"""Target selection: the per-example scalar that a method differentiates."""
from __future__ import annotations

import tensorflow as tf

from gradserve.server.core.spec import TargetKey

__all__ = ["select_target", "apply_transform"]


def apply_transform(y: tf.Tensor, transform: str) -> tf.Tensor:
    """Apply the selector's transform over the last axis."""
    if transform == "softmax":
        return tf.nn.softmax(y, axis=-1)
    if transform == "log_softmax":
        return tf.nn.log_softmax(y, axis=-1)
    if transform == "sigmoid":
        return tf.sigmoid(y)
    return y


def select_target(y: tf.Tensor, target: TargetKey, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example scalar and the index used (-1 for a sum).

    ``y`` is the selected output head, batch first; ``indices`` is (batch,) int64 (used by kind
    "index"). For heads of rank > 2 the index applies to the last axis and the other axes are summed.
    """
    y = apply_transform(y, target.transform)
    batch = tf.shape(y)[0]
    if target.kind == "sum" or y.shape.rank == 1:
        axes = list(range(1, y.shape.rank))
        value = tf.reduce_sum(y, axis=axes) if axes else y
        return value, tf.fill([batch], tf.constant(-1, tf.int64))
    per_class = tf.reduce_sum(y, axis=list(range(1, y.shape.rank - 1))) if y.shape.rank > 2 else y
    if target.kind == "argmax":
        indices = tf.argmax(tf.stop_gradient(per_class), axis=-1, output_type=tf.int64)
    value = tf.gather(per_class, indices, axis=1, batch_dims=1)
    return value, indices

"""SmoothGrad: a base attribution (gradient, input x gradient or IG) over noisy copies of the input.

Noise is drawn on the host with NumPy's PCG64 generator from the request's seed, as standard
normal samples shaped like one example, ``(samples, *input_shape)``, and scaled in the graph by
each example's stdev (``noise`` x the example's value range, or ``stdev``). Every example sees
the same standard-normal draws, so an example's result does not depend on the batch it came in,
on how the engine or the batcher split the batch, or on the chunk size: the same seed gives
bit-identical results. Samples are evaluated ``per_chunk`` at a time (sized from
``Limits.chunk_elements``) in a ``tf.while_loop``; padding samples have weight 0.

Aggregations: ``mean`` (SmoothGrad), ``square`` (mean of squares, SmoothGrad^2) and ``var``
(variance, computed around the attribution of the clean input so that it is 0, not rounding
noise, when every sample has the same attribution).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.gradient import feed_of, gradients_or_zeros, target_array, target_of
from gradserve.server.compute.methods.integrated import (
    BASELINE,
    baseline_arrays,
    integrate,
    path_layout,
    point_target,
    single_chunk,
    tile_rows,
)
from gradserve.server.compute.methods.layers import check_model_options, forward
from gradserve.server.compute.methods.quadrature import chunked
from gradserve.server.compute.methods.targets import select_target
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.spec import (
    ATTRIBUTION,
    INPUT,
    OUTPUT,
    TARGET_INDICES,
    ComputeSpec,
    PreparedCall,
    SmoothGradOptions,
    TargetKey,
)
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["SmoothGrad", "SmoothGradKey"]

NOISE = "noise/"
SIGMA = "sigma/"


class SmoothGradKey(NamedTuple):
    method: str
    target: TargetKey
    wrt: tuple[str, ...]
    explicit: bool
    include_outputs: bool
    base_method: str
    aggregation: str
    #: One chunk of samples / of integrated-gradient path points: no loop is traced.
    one_sample_chunk: bool
    one_path_chunk: bool


def _noise(spec: ComputeSpec, seed: int | None, samples: int, per_chunk: int) -> dict[str, np.ndarray]:
    """Shared standard-normal draws per wrt input, laid out (chunks, per_chunk, *example_shape)."""
    rng = np.random.default_rng(None if seed is None else int(seed) % (1 << 64))
    chunks = -(-samples // per_chunk)
    out = {}
    for n in spec.wrt:  # fixed order: the draws of an input do not depend on the chunk layout
        x = spec.inputs[n]
        z = rng.standard_normal((samples,) + x.shape[1:], dtype=np.float64).astype(x.dtype)
        padded = np.zeros((chunks * per_chunk,) + x.shape[1:], x.dtype)
        padded[:samples] = z
        out[NOISE + n] = padded.reshape((chunks, per_chunk) + x.shape[1:])
    return out


def _sigmas(spec: ComputeSpec, opts: SmoothGradOptions) -> dict[str, np.ndarray]:
    """Per-example noise stdev per wrt input, (batch,)."""
    out = {}
    for n in spec.wrt:
        x = spec.inputs[n]
        if opts.stdev is not None:
            s = np.full(x.shape[0], opts.stdev, np.float64)
        else:
            level = opts.noise
            flat = x.reshape(x.shape[0], -1).astype(np.float64)
            s = level * (flat.max(axis=1) - flat.min(axis=1)) if flat.shape[1] else np.zeros(x.shape[0])
        out[SIGMA + n] = s.astype(x.dtype)
    return out


@register
class SmoothGrad(SensitivityMethod):
    """SmoothGrad over gradient, input x gradient or integrated gradients."""

    name = "smoothgrad"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        check_model_options(spec, model)
        if spec.layer:
            raise InvalidArgumentError("layer: smoothgrad attributes inputs; layer attribution is not supported")
        opts = spec.options if isinstance(spec.options, SmoothGradOptions) else SmoothGradOptions()
        samples, base = opts.samples, opts.base_method
        per_example = sum(int(np.prod(spec.inputs[n].shape[1:])) for n in spec.wrt)
        if samples * per_example > limits.max_elements:
            raise InvalidArgumentError(f"smoothgrad.samples: {samples} samples of {per_example} elements exceed "
                                       f"the limit of {limits.max_elements} noise elements")
        per_row = sum(int(np.prod(a.shape[1:])) for a in spec.inputs.values())
        batched: dict[str, np.ndarray] = {INPUT + n: a for n, a in spec.inputs.items()}
        batched["target"] = target_array(spec)
        batched.update(_sigmas(spec, opts))
        shared: dict[str, np.ndarray] = {}
        if base == "integrated_gradients":
            # One sample at a time; the IG path inside is chunked as usual.
            per_chunk = 1
            shared.update(path_layout(opts.integrated.steps, opts.integrated.quadrature, spec.batch_size,
                                      per_row, limits))
            batched.update(baseline_arrays(spec, spec.wrt))
        else:
            per_chunk = max(1, min(samples, limits.chunk_elements // max(1, spec.batch_size * per_row)))
        shared.update(_noise(spec, opts.seed, samples, per_chunk))
        _, w = chunked(np.zeros(samples), np.full(samples, 1.0 / samples), per_chunk)
        shared["sample_weights"] = w
        # Static flags: one chunk of samples / of IG path points (then no loop is traced).
        one_sample_chunk = w.shape[0] == 1
        one_path_chunk = base == "integrated_gradients" and single_chunk(shared)
        key = SmoothGradKey(self.name, target_of(spec), spec.wrt, spec.wrt_explicit, spec.include_outputs, base,
                            opts.aggregation, one_sample_chunk, one_path_chunk)
        return PreparedCall(key, batched, shared)

    def build(self, model: ModelFunction, key: SmoothGradKey) -> CompiledBody:
        target, wrt, explicit, base, kind = key.target, key.wrt, key.explicit, key.base_method, key.aggregation
        include_outputs = key.include_outputs
        at_points = point_target(target)

        def attribute(feed: Mapping[str, tf.Tensor], idx: tf.Tensor, batched: Mapping[str, tf.Tensor],
                      shared: Mapping[str, tf.Tensor], k: tf.Tensor | int) -> list[tf.Tensor]:
            """Base attributions of a (k * batch)-row feed."""
            if base == "integrated_gradients":
                baselines = {n: tile_rows(batched[BASELINE + n], k) for n in wrt}
                out = integrate(model, feed, at_points, idx, wrt, baselines, shared["alphas"],
                                shared["weights"], explicit, single_chunk=key.one_path_chunk)
                return [out[n] for n in wrt]
            xs = [feed[n] for n in wrt]
            with tf.GradientTape() as tape:
                tape.watch(xs)
                y, _ = select_target(forward(model, feed, at_points).head, at_points, idx)
                total = tf.reduce_sum(y)
            grads = gradients_or_zeros(tape.gradient(total, xs), xs, wrt, explicit, target.output)
            return [g * x if base == "input_x_gradient" else g for g, x in zip(grads, xs)]

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            fx = forward(model, feed, target)
            _, idx = select_target(fx.head, target, batched["target"])
            center = attribute(feed, idx, batched, shared, 1) if kind == "var" else \
                [tf.zeros_like(feed[n]) for n in wrt]
            weights = shared["sample_weights"]

            def step(c: tf.Tensor, sums: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
                w = weights[c]
                k = tf.shape(w)[0]
                noisy = {}
                for n in wrt:
                    x = feed[n]
                    z = shared[NOISE + n][c]                                   # (k, *example)
                    sigma = tf.reshape(batched[SIGMA + n], tf.concat([[1, -1], tf.ones([x.shape.rank - 1],
                                                                                    tf.int32)], 0))
                    noisy[n] = tf.reshape(x[None] + sigma * z[:, None], tf.concat([[-1], tf.shape(x)[1:]], 0))
                tiled = {m: noisy[m] if m in noisy else tile_rows(v, k) for m, v in feed.items()}
                attrs = attribute(tiled, tile_rows(idx, k), batched, shared, k)
                new = []
                for i, (n, a) in enumerate(zip(wrt, attrs)):
                    x = feed[n]
                    a = tf.reshape(a, tf.concat([[k], tf.shape(x)], 0)) - center[i][None]
                    wk = tf.reshape(tf.cast(w, a.dtype), tf.concat([[k], tf.ones([x.shape.rank], tf.int32)], 0))
                    new.append(sums[2 * i] + tf.reduce_sum(wk * a, axis=0))
                    new.append(sums[2 * i + 1] + tf.reduce_sum(wk * tf.square(a), axis=0))
                return c + 1, tuple(new)

            zeros = tuple(tf.zeros_like(feed[n]) for n in wrt for _ in range(2))
            if key.one_sample_chunk:
                _, sums = step(tf.constant(0), zeros)
            else:
                _, sums = tf.while_loop(lambda c, _: c < tf.shape(weights)[0], step, (tf.constant(0), zeros))
            result = {TARGET_INDICES: idx}
            for i, n in enumerate(wrt):
                mean, square = sums[2 * i], sums[2 * i + 1]
                if kind == "mean":
                    value = mean
                elif kind == "square":
                    value = square
                else:
                    value = tf.maximum(square - tf.square(mean), 0.0)
                result[ATTRIBUTION + n] = value
            if include_outputs:
                result.update({OUTPUT + k: v for k, v in fx.outputs.items()})
            return result
        return body


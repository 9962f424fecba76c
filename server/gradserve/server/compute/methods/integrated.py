"""Integrated gradients: the path integral of the gradient from a baseline, in one compiled call.

The attribution of input ``x`` from baseline ``x'`` is ``(x - x') * sum_i w_i grad f(x' + a_i (x - x'))``
with the nodes ``a_i`` and weights ``w_i`` of a quadrature rule on [0, 1] (``quadrature``).
Nodes and weights enter the compiled function as a shared ``(chunks, per_chunk)`` tensor, so one
trace serves every step count and rule; a ``tf.while_loop`` evaluates ``per_chunk`` path points
of every example at once (``per_chunk`` is sized from ``Limits.chunk_elements``), so memory does
not grow with steps x batch. With ``layer`` the path runs in that layer's output space, from the
layer's output at the baseline inputs to its output at the inputs (Captum's layer IG), which is
how integer inputs (token ids into an Embedding) are attributed.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from gradserve.server.compute.methods import CompiledBody, SensitivityMethod, register
from gradserve.server.compute.methods.gradient import feed_of, not_connected, target_array, target_of
from gradserve.server.compute.methods.layers import check_model_options, forward
from gradserve.server.compute.methods.quadrature import chunked, nodes_and_weights
from gradserve.server.compute.methods.targets import select_target
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError, NotFoundError
from gradserve.server.core.spec import (
    ATTRIBUTION,
    EXTRA,
    INPUT,
    OUTPUT,
    TARGET_INDICES,
    ComputeSpec,
    IntegratedGradientsOptions,
    PreparedCall,
    TargetKey,
)
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["IntegratedGradients", "IntegratedGradientsKey", "baseline_arrays", "path_layout", "single_chunk",
           "integrate", "point_target", "tile_rows"]

BASELINE = "baseline/"


class IntegratedGradientsKey(NamedTuple):
    method: str
    target: TargetKey
    wrt: tuple[str, ...]
    explicit: bool
    include_outputs: bool
    layer: str
    return_delta: bool
    #: The path has one chunk of points: no loop is traced.
    single_chunk: bool


def _baseline(value: Any, x: np.ndarray, name: str) -> np.ndarray:
    """One baseline broadcast to the input's full shape, in the input's dtype."""
    field = f"integrated_gradients.baselines[{name!r}]"
    b = np.asarray(value)
    if b.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"{field}: dtype {b.dtype.name} is not numeric")
    try:
        ok = np.broadcast_shapes(b.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgumentError(f"{field}: shape {list(b.shape)} is neither a scalar, an array broadcastable "
                                   f"to one example {list(x.shape[1:])}, nor one per example {list(x.shape)}")
    if x.dtype.kind in "iub" and b.dtype.kind == "f" and not np.array_equal(b, np.round(b)):
        raise InvalidArgumentError(f"{field}: input {name!r} is {x.dtype.name}; its baseline must hold integers")
    return np.ascontiguousarray(np.broadcast_to(b.astype(x.dtype), x.shape))


def baseline_arrays(spec: ComputeSpec, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Batched ``baseline/<name>`` arrays for ``names`` (default 0); unknown names are NOT_FOUND."""
    given: Mapping[str, Any] = spec.baselines
    for n in given:
        if n not in spec.inputs:
            raise NotFoundError(f"integrated_gradients.baselines: unknown input {n!r}; the model's inputs are "
                                f"{list(spec.inputs)}")
    return {BASELINE + n: _baseline(given.get(n, 0.0), spec.inputs[n], n) for n in names}


def single_chunk(shared: Mapping[str, np.ndarray]) -> bool:
    """Whether a path layout has one chunk (the compiled function then skips the loop)."""
    return int(shared["alphas"].shape[0]) == 1


def path_layout(steps: int, rule: str, rows: int, elements_per_row: int, limits: Limits
                ) -> dict[str, np.ndarray]:
    """Shared ``alphas``/``weights`` arrays, ``(chunks, per_chunk)``, with ``per_chunk`` path points of
    ``rows`` examples (``elements_per_row`` input elements each) fitting ``limits.chunk_elements``."""
    alphas, weights = nodes_and_weights(rule, steps)
    per_chunk = max(1, limits.chunk_elements // max(1, rows * elements_per_row))
    a, w = chunked(alphas, weights, per_chunk)
    return {"alphas": a, "weights": w}


def point_target(target: TargetKey) -> TargetKey:
    """The target to use at path points: argmax is resolved once at the input, then fixed."""
    return target._replace(kind="index") if target.kind == "argmax" else target


def tile_rows(x: tf.Tensor, k: tf.Tensor | int) -> tf.Tensor:
    """``k`` copies of a batch, copy-major: (batch, ...) -> (k * batch, ...)."""
    return tf.tile(x, tf.stack([k] + [1] * (x.shape.rank - 1)))


def _rows(x: tf.Tensor) -> Any:
    """Shape (-1, *x.shape[1:]) for reshapes: static where the signature fixes it (fewer ops)."""
    tail = x.shape[1:]
    return [-1] + tail.as_list() if tail.is_fully_defined() else tf.concat([[-1], tf.shape(x)[1:]], 0)


def _along(a: tf.Tensor, rank: int) -> tf.Tensor:
    """Reshape (k,) to (k, 1, ..., 1) to broadcast over (k, batch, ...)."""
    return tf.reshape(a, [-1] + [1] * rank)


def _weighted_sum(g: tf.Tensor, w: tf.Tensor, k: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """sum_i w_i g_i for g of (k * batch, ...) rows, shaped like ``like`` (batch, ...)."""
    flat = tf.reshape(g, tf.stack([k, -1]))
    return tf.reshape(tf.linalg.matvec(flat, tf.cast(w, g.dtype), transpose_a=True), tf.shape(like))


def integrate(model: ModelFunction, feed: Mapping[str, tf.Tensor], target: TargetKey, idx: tf.Tensor,
              wrt: Sequence[str], baselines: Mapping[str, tf.Tensor], alphas: tf.Tensor, weights: tf.Tensor,
              explicit: bool, layer: str = "", layer_ends: tuple[tf.Tensor, tf.Tensor] | None = None,
              single_chunk: bool = False) -> dict[str, tf.Tensor]:
    """Integrated gradients of one batch: attribution per wrt input (or for ``layer``).

    ``target`` must not be argmax (use ``point_target``); ``idx`` is (batch,). ``alphas`` and
    ``weights`` are (chunks, per_chunk); ``single_chunk`` promises chunks == 1. In layer mode
    ``layer_ends`` is (layer output at the baseline, layer output at the input) and the result is
    keyed by the layer name.
    """
    if layer:
        assert layer_ends is not None
        start, end = layer_ends
        names: list[str] = [layer]
        starts, ends = {layer: start}, {layer: end}
    else:
        names = list(wrt)
        starts = {n: baselines[n] for n in names}
        ends = {n: feed[n] for n in names}

    def chunk_gradients(a: tf.Tensor) -> list[tf.Tensor]:
        k = tf.shape(a)[0]
        points = {}
        for n in names:
            s, e = starts[n], ends[n]
            ak = _along(tf.cast(a, e.dtype), e.shape.rank)
            points[n] = tf.reshape(s[None] + ak * (e - s)[None], _rows(e))
        with tf.GradientTape() as tape:
            if layer:
                tiled = {m: tile_rows(v, k) for m, v in feed.items()}
                fwd = forward(model, tiled, target, layer=layer, replace=lambda _: points[layer],
                              watch=tape.watch)
            else:
                tiled = {m: points[m] if m in points else tile_rows(v, k) for m, v in feed.items()}
                tape.watch([points[n] for n in names])
                fwd = forward(model, tiled, target)
            y, _ = select_target(fwd.head, target, tile_rows(idx, k))
            total = tf.reduce_sum(y)
        sources = [fwd.layer] if layer else [points[n] for n in names]
        grads = tape.gradient(total, sources)
        out = []
        for n, g in zip(names, grads):
            if g is None:
                if explicit and not layer:
                    raise not_connected(target.output, n)
                g = tf.zeros_like(points[n])
            out.append(g)
        return out

    def step(c: tf.Tensor, accs: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        a = alphas[c]
        k = tf.shape(a)[0]
        grads = chunk_gradients(a)
        return c + 1, tuple(acc + _weighted_sum(g, weights[c], k, acc) for acc, g in zip(accs, grads))

    accs0 = tuple(tf.zeros_like(ends[n]) for n in names)
    if single_chunk:  # the common case: no loop, whose control flow costs a few % on small models
        _, accs = step(tf.constant(0), accs0)
    else:
        _, accs = tf.while_loop(lambda c, _: c < tf.shape(alphas)[0], step, (tf.constant(0), accs0))
    return {n: (ends[n] - starts[n]) * acc for n, acc in zip(names, accs)}


@register
class IntegratedGradients(SensitivityMethod):
    """Integrated gradients with a quadrature rule, optional convergence delta."""

    name = "integrated_gradients"

    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        check_model_options(spec, model)
        opts = spec.options if isinstance(spec.options, IntegratedGradientsOptions) else IntegratedGradientsOptions()
        # Layer mode interpolates the layer output between its values at the baseline inputs and
        # at the inputs: every input gets a baseline. Input mode: the wrt inputs.
        names = list(spec.inputs) if spec.layer else list(spec.wrt)
        batched: dict[str, np.ndarray] = {INPUT + n: a for n, a in spec.inputs.items()}
        batched.update(baseline_arrays(spec, names))
        batched["target"] = target_array(spec)
        per_row = sum(int(np.prod(a.shape[1:])) for a in spec.inputs.values())
        shared = path_layout(opts.steps, opts.quadrature, spec.batch_size, per_row, limits)
        wrt = () if spec.layer else spec.wrt
        key = IntegratedGradientsKey(self.name, target_of(spec), wrt, spec.wrt_explicit, spec.include_outputs,
                                     spec.layer, opts.return_delta, single_chunk(shared))
        return PreparedCall(key, batched, shared)

    def build(self, model: ModelFunction, key: IntegratedGradientsKey) -> CompiledBody:
        target, wrt, layer = key.target, key.wrt, key.layer
        include_outputs, return_delta = key.include_outputs, key.return_delta
        at_points = point_target(target)

        def body(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            feed = feed_of(model, batched)
            idx = batched["target"]
            # The forward pass at the input is needed only for argmax, outputs, delta or layer mode.
            fx = None
            if target.kind == "argmax" or include_outputs or return_delta or layer:
                fx = forward(model, feed, target, layer=layer)
                y_input, idx = select_target(fx.head, target, batched["target"])
            ends = None
            if layer:
                assert fx is not None
                fb = forward(model, {n: batched[BASELINE + n] for n in feed}, target, layer=layer)
                ends = (fb.layer_original, fx.layer_original)
            baselines = {n: batched[BASELINE + n] for n in wrt}
            attrs = integrate(model, feed, at_points, idx, wrt, baselines, shared["alphas"], shared["weights"],
                              key.explicit, layer, ends, key.single_chunk)
            if target.kind == "sum":
                idx = tf.fill(tf.shape(idx), tf.constant(-1, tf.int64))  # as select_target reports sums
            result = {TARGET_INDICES: idx}
            result.update({ATTRIBUTION + n: a for n, a in attrs.items()})
            if return_delta:
                if ends is not None:
                    start = ends[0]
                    fb0 = forward(model, feed, at_points, layer=layer, replace=lambda _: start)
                else:
                    fb0 = forward(model, {n: baselines.get(n, v) for n, v in feed.items()}, at_points)
                y_base, _ = select_target(fb0.head, at_points, idx)
                total = tf.add_n([tf.reduce_sum(a, axis=list(range(1, a.shape.rank))) if a.shape.rank > 1 else a
                                  for a in attrs.values()])
                result[EXTRA + "delta"] = total - (y_input - y_base)
                result[EXTRA + "f_input"] = y_input
                result[EXTRA + "f_baseline"] = y_base
            if include_outputs and fx is not None:
                result.update({OUTPUT + k: v for k, v in fx.outputs.items()})
            return result
        return body

"""The explained scalar per example out of a model output, taken as the gradient methods take it.

The same selection as ``compute.methods.targets.select_target`` (which runs inside the compiled
functions), in NumPy, for the algorithms that only evaluate the model: the transform over the
last axis, then the sum of the output or one index of its last axis (other axes summed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Target", "transform", "per_class", "values", "argmax_indices"]


@dataclass(frozen=True, eq=False)
class Target:
    """Which scalar per explained example: ``kind`` "sum", "index" (``indices``, one per
    explained example, non-negative) or "argmax" (of the explained example's own output)."""

    kind: str = "sum"
    transform: str = "identity"
    indices: np.ndarray | None = None


def transform(y: np.ndarray, name: str) -> np.ndarray:
    """``y`` (float64) after the selector's transform over its last axis."""
    if name in ("softmax", "log_softmax"):
        shifted = y - y.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        out: np.ndarray = shifted - log_norm
        return np.exp(out) if name == "softmax" else out
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * y))   # overflow-free logistic
    return y


def per_class(y: np.ndarray, transform_name: str) -> np.ndarray:
    """The transformed output with every axis but the batch and the last summed: ``(rows, classes)``,
    or ``(rows,)`` for an output of rank 1."""
    t = transform(np.asarray(y, np.float64), transform_name)
    if t.ndim > 2:
        t = t.sum(axis=tuple(range(1, t.ndim - 1)))
    return t


def values(y: np.ndarray, target: Target, indices: np.ndarray | None = None) -> np.ndarray:
    """The explained scalar of each row of ``y`` (the selected output head, batch first).

    ``indices`` (one per row) are used for "index" and "argmax" targets (resolved already).
    """
    t = transform(np.asarray(y, np.float64), target.transform)
    if target.kind == "sum" or t.ndim == 1:
        total: np.ndarray = t.reshape(len(t), -1).sum(axis=1)
        return total
    if t.ndim > 2:
        t = t.sum(axis=tuple(range(1, t.ndim - 1)))
    assert indices is not None
    picked: np.ndarray = np.take_along_axis(t, indices.reshape(-1, 1).astype(np.int64), axis=1)[:, 0]
    return picked


def argmax_indices(y: np.ndarray, transform_name: str) -> np.ndarray:
    """The index of the largest transformed value of each row's last axis (other axes summed)."""
    t = per_class(y, transform_name)
    if t.ndim == 1:
        return np.zeros(len(t), np.int64)
    picked: np.ndarray = np.argmax(t, axis=-1).astype(np.int64)
    return picked

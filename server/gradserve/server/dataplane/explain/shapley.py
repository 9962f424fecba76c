"""Shapley values from coalition values: exactly from every coalition, or by Kernel SHAP's
weighted least squares under the efficiency constraint.

``v(S)`` is the value of coalition S for one explained row x: the mean over the background rows b
of f(x_S, b_{not S}) (interventional Shapley values). ``v(empty) = E[f(background)]`` and
``v(all) = f(x)``.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["exact_weights", "exact_shapley", "kernel_shapley"]


def exact_weights(features: int) -> np.ndarray:
    """The Shapley weight |S|! (M - |S| - 1)! / M! of a coalition of each size 0..M-1."""
    m = features
    return np.array([math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)])


def exact_shapley(values: np.ndarray) -> np.ndarray:
    """Exact Shapley values ``(n, M)`` from the values ``(n, 2**M)`` of every coalition, column
    ``b`` holding the features whose bits are set in ``b``:

        phi_i = sum over S without i of |S|! (M - |S| - 1)! / M! (v(S + i) - v(S)).
    """
    n, total = values.shape
    m = total.bit_length() - 1
    index = np.arange(total, dtype=np.int64)
    size = np.zeros(total, np.int64)
    for i in range(m):
        size += (index >> i) & 1
    weights = exact_weights(m)
    phi = np.empty((n, m), np.float64)
    v = np.asarray(values, np.float64)
    for i in range(m):
        without = index[(index >> i) & 1 == 0]
        phi[:, i] = (v[:, without | (1 << i)] - v[:, without]) @ weights[size[without]]
    return phi


def kernel_shapley(masks: np.ndarray, weights: np.ndarray, values: np.ndarray, f_x: np.ndarray,
                   f_null: np.ndarray) -> np.ndarray:
    """Kernel SHAP: the weighted least-squares fit of ``values`` ``(n, K)`` on the coalitions
    ``masks`` ``(K, M)`` with ``weights`` ``(K,)``, constrained to sum to ``f_x - f_null`` per row.

    The constraint eliminates the last feature (phi_M = f_x - f_null - sum of the others), as the
    ``shap`` library does; the normal equations are solved once for every row (the coalitions are
    shared), falling back to least squares when they are singular (too few coalitions).
    """
    m = masks.shape[1]
    delta = np.asarray(f_x, np.float64) - np.asarray(f_null, np.float64)
    n = len(delta)
    if m == 1:
        return delta.reshape(n, 1)
    z = masks.astype(np.float64)
    x = z[:, :-1] - z[:, -1:]
    y = (np.asarray(values, np.float64) - np.asarray(f_null, np.float64)[:, None]) - z[:, -1][None, :] * delta[:, None]
    wx = weights[:, None] * x
    try:
        w = np.linalg.solve(x.T @ wx, wx.T @ y.T)
    except np.linalg.LinAlgError:
        root = np.sqrt(weights)[:, None]
        w = np.linalg.lstsq(root * x, root * y.T, rcond=None)[0]
    phi = np.empty((n, m), np.float64)
    phi[:, :-1] = w.T
    phi[:, -1] = delta - w.sum(axis=0)
    return phi

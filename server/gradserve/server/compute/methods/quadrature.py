"""Quadrature rules on [0, 1] for integrated gradients (NumPy only, no TensorFlow).

Every rule returns ``(alphas, weights)`` in float64 with ``n`` points: the path points
``baseline + alpha * (input - baseline)`` and weights that sum to 1 (so that a constant
gradient is integrated exactly, whatever the rule and ``n``). The weights are renormalised so
that their float64 sum is 1 to the last bit where possible; in particular the trapezoid rule on
``n`` points spans [0, 1] with end weights ``1 / (2 (n - 1))``, whose total is 1 (a trapezoid
whose weights sum to less than 1 would bias every attribution low).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["RULES", "nodes_and_weights", "chunked"]

#: Names of the rules, as the SDK spells them.
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _normalise(weights: np.ndarray) -> np.ndarray:
    """Scale weights to sum to 1, then put the rounding residue on the largest weight."""
    weights = weights / math.fsum(weights.tolist())
    i = int(np.argmax(weights))
    weights[i] += 1.0 - math.fsum(weights.tolist())
    return weights


def nodes_and_weights(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Path points and weights of ``rule`` with ``n`` points on [0, 1].

    Parameters
    ----------
    rule
        One of ``RULES``.
    n
        Number of points, at least 1 (the trapezoid rule with one point is the midpoint rule).

    Returns
    -------
    alphas, weights
        float64 arrays of length ``n``; ``weights`` sums to 1.

    Raises
    ------
    ValueError
        For an unknown rule or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"steps: need at least 1 point, got {n}")
    i = np.arange(n, dtype=np.float64)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = (x + 1.0) / 2.0, w / 2.0
    elif rule == "riemann_left":
        alphas, weights = i / n, np.full(n, 1.0 / n)
    elif rule == "riemann_right":
        alphas, weights = (i + 1.0) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_middle":
        alphas, weights = (i + 0.5) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_trapezoid":
        if n == 1:
            alphas, weights = np.array([0.5]), np.array([1.0])
        else:
            alphas = i / (n - 1)
            weights = np.full(n, 1.0 / (n - 1))
            weights[0] = weights[-1] = 0.5 / (n - 1)
    else:
        raise ValueError(f"quadrature: unknown rule {rule!r}; expected one of {list(RULES)}")
    return alphas.astype(np.float64), _normalise(np.asarray(weights, np.float64))


def chunked(alphas: np.ndarray, weights: np.ndarray, per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay points out as ``(chunks, per_chunk)`` arrays for a loop over chunks.

    The last chunk is padded by repeating the last point with weight 0: a repeated point keeps
    the padded evaluations finite wherever the real ones are (0 * inf would be NaN).
    """
    n = len(alphas)
    per_chunk = max(1, min(int(per_chunk), n))
    chunks = -(-n // per_chunk)
    pad = chunks * per_chunk - n
    a = np.concatenate([alphas, np.repeat(alphas[-1:], pad)])
    w = np.concatenate([weights, np.zeros(pad)])
    return a.reshape(chunks, per_chunk), w.reshape(chunks, per_chunk)

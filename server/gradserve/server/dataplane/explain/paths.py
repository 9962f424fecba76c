"""Expected gradients (Gradient SHAP): background rows and path points, stratified.

phi_i(x) = E_{b ~ background, t ~ U(0, 1)} [ (x_i - b_i) * d f / d x_i (b + t (x - b)) ]

(Erion et al., 2021; the ``shap`` library's GradientExplainer draws b and t at random for each of
``nsamples`` points). Here the background rows are stratified: with S points and N rows each row
is used floor(S / N) times and S mod N rows, drawn without replacement, once more; so with S a
multiple of N every row is used equally and the attributions of a linear model are exactly
w_i (x_i - E[b_i]). The points along the path from one background row are stratified on [0, 1]
too: the k-th of its m points lies in [k/m, (k+1)/m).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PathPoints", "default_samples", "path_points"]

#: The ``shap`` library's GradientExplainer default points per explained row.
AUTO_SAMPLES = 200


@dataclass(frozen=True, eq=False)
class PathPoints:
    """``background[s]``: the background row of point s; ``alphas[s]``: its position t on the path."""

    background: np.ndarray
    alphas: np.ndarray

    def __len__(self) -> int:
        return len(self.background)


def default_samples(background_rows: int) -> int:
    """The smallest multiple of the background rows that is at least 200."""
    return background_rows * math.ceil(AUTO_SAMPLES / background_rows)


def path_points(background_rows: int, samples: int, rng: np.random.Generator) -> PathPoints:
    """``samples`` points, shared by every explained row (see the module docstring)."""
    n = background_rows
    rounds, extra = divmod(samples, n)
    rows = np.concatenate([np.tile(np.arange(n, dtype=np.int64), rounds),
                           np.sort(rng.choice(n, extra, replace=False)).astype(np.int64)])
    uses = np.bincount(rows, minlength=n)
    # The rank of each point among the points of its row: stratum k of uses[row].
    order = np.argsort(rows, kind="stable")
    rank = np.empty(samples, np.int64)
    starts = np.concatenate([[0], np.cumsum(uses)[:-1]])
    rank[order] = np.arange(samples) - np.repeat(starts, uses)
    alphas = (rank + rng.random(samples)) / uses[rows]
    return PathPoints(rows, alphas)

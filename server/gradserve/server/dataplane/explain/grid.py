"""Partial-dependence grids, built from the data as scikit-learn's ``partial_dependence`` builds them.

For each feature: its unique values when there are fewer than ``grid_resolution`` of them, else
``grid_resolution`` evenly spaced points between two percentiles of its values (scipy's
``mquantiles`` with its default plotting positions, alphap = betap = 0.4, as scikit-learn uses).
Two features make a two-way grid, their Cartesian product.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gradserve.server.core.errors import InvalidArgumentError

__all__ = ["mquantiles", "axis_values", "cartesian"]


def mquantiles(values: np.ndarray, probs: Sequence[float], alphap: float = 0.4, betap: float = 0.4) -> np.ndarray:
    """Sample quantiles as ``scipy.stats.mstats.mquantiles`` computes them (no masked values)."""
    data = np.sort(np.asarray(values, np.float64).reshape(-1))
    n = len(data)
    p = np.asarray(probs, np.float64)
    m = alphap + p * (1.0 - alphap - betap)
    aleph = n * p + m
    k = np.floor(np.clip(aleph, 1, n - 1)).astype(np.int64)
    gamma = np.clip(aleph - k, 0.0, 1.0)
    out: np.ndarray = (1.0 - gamma) * data[k - 1] + gamma * data[k]
    return out


def axis_values(column: np.ndarray, percentiles: tuple[float, float], resolution: int, *,
                integer: bool = False, field: str = "partial_dependence") -> np.ndarray:
    """The grid of one feature from its values over the rows (see the module docstring).

    ``integer``: the feature is an integer input; the points are rounded to integers (and
    repeated ones dropped).
    """
    uniques = np.unique(np.asarray(column).reshape(-1))
    if len(uniques) < resolution:
        axis = uniques.astype(np.float64)
    else:
        low, high = mquantiles(column, percentiles)
        if np.allclose(low, high):
            raise InvalidArgumentError(f"{field}.percentiles: the percentiles {list(percentiles)} of the feature's "
                                       f"values are too close to each other ({low:g}) to build a grid; choose "
                                       "percentiles further apart")
        axis = np.linspace(low, high, num=resolution, endpoint=True)
    if integer:
        axis = np.unique(np.rint(axis))
    return axis


def cartesian(axes: Sequence[np.ndarray]) -> np.ndarray:
    """Every combination of the axes' values, ``(points, len(axes))``, the last axis fastest
    (scikit-learn's ``cartesian``)."""
    mesh = np.meshgrid(*[np.asarray(a, np.float64) for a in axes], indexing="ij")
    return np.stack([g.reshape(-1) for g in mesh], axis=1)

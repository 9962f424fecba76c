"""Indices from model outputs (and gradients): SALib's estimators, and DGSM from exact gradients.

SALib's DGSM takes finite differences of N * (D + 1) evaluations; here the derivatives come from
N gradient evaluations by autodiff, and the measures follow SALib's definitions: ``vi`` is the
mean of (df/dx_i)^2, ``vi_std`` its standard deviation (ddof 0), and ``dgsm`` = vi * (high -
low)^2 / (pi^2 * Var(f)). ``dgsm_conf`` is the half-width of a bootstrap interval of ``dgsm``
itself (SALib resamples ``vi`` only and scales the interval of ``vi``).
"""
from __future__ import annotations

import numpy as np
from scipy import stats  # type: ignore[import-untyped, unused-ignore]

from gradserve.server.core.errors import FailedPreconditionError
from gradserve.server.dataplane.gsa.problem import Analysis

__all__ = ["check_outputs", "sobol_indices", "morris_measures", "dgsm_measures"]


def check_outputs(y: np.ndarray, grads: np.ndarray | None = None) -> None:
    """Refuse outputs that no index can be computed from (non-finite, or constant)."""
    bad = int(np.count_nonzero(~np.isfinite(y)))
    if grads is not None:
        bad += int(np.count_nonzero(~np.isfinite(grads).all(axis=1)))
    if bad:
        raise FailedPreconditionError(f"model: the output (or its gradient) is NaN or Inf at {bad} of {len(y)} "
                                      "samples; narrow the bounds to where the model is finite")
    if not np.var(y) > 0:
        raise FailedPreconditionError("model: the output does not vary over the samples (variance 0); "
                                      "its sensitivity indices are undefined")


def sobol_indices(analysis: Analysis, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """S1, S1_conf, ST, ST_conf (and S2, S2_conf) with SALib's estimators and bootstrap."""
    from SALib.analyze import sobol  # type: ignore[import-untyped, unused-ignore]

    s = sobol.analyze(analysis.salib_problem(), y, calc_second_order=analysis.second_order,
                      num_resamples=analysis.resamples, conf_level=analysis.conf_level, seed=seed)
    keys = ["S1", "S1_conf", "ST", "ST_conf"] + (["S2", "S2_conf"] if analysis.second_order else [])
    return {k: np.asarray(s[k], dtype=np.float64) for k in keys}


def morris_measures(analysis: Analysis, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """mu, mu_star, sigma, mu_star_conf with SALib's Morris analysis."""
    from SALib.analyze import morris  # type: ignore[import-untyped, unused-ignore]

    s = morris.analyze(analysis.salib_problem(), x, y, num_resamples=analysis.resamples,
                       conf_level=analysis.conf_level, num_levels=analysis.levels, seed=seed)
    return {k: np.asarray(s[k], dtype=np.float64) for k in ("mu", "mu_star", "sigma", "mu_star_conf")}


def dgsm_measures(analysis: Analysis, grads: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """vi, vi_std, dgsm and dgsm_conf from exact gradients ``grads`` (N, D) and outputs ``y`` (N,)."""
    squares = np.square(grads, dtype=np.float64)
    width2 = np.array([(f.params[1] - f.params[0]) ** 2 for f in analysis.factors])
    scale = width2 / np.pi**2
    vi = squares.mean(axis=0)
    dgsm = vi * scale / np.var(y)
    rng = np.random.default_rng(seed)
    n = len(y)
    boot = np.empty((analysis.resamples, analysis.dimension))
    for b in range(analysis.resamples):
        rows = rng.integers(n, size=n)
        var = np.var(y[rows])
        boot[b] = squares[rows].mean(axis=0) * scale / var if var > 0 else np.nan
    z = stats.norm.ppf(0.5 + analysis.conf_level / 2)
    conf = z * np.nanstd(boot, axis=0, ddof=1)
    return {"vi": vi, "vi_std": squares.std(axis=0), "dgsm": dgsm, "dgsm_conf": conf}

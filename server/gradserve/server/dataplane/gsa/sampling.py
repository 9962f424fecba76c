"""Sample matrices of the analyses, drawn with SALib's samplers (scipy's Sobol' sequence for DGSM).

Every draw is a pure function of the analysis and its seed: the matrix is made whole before any
evaluation, so how the evaluations are chunked never changes the answer.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats  # type: ignore[import-untyped, unused-ignore]
from scipy.stats import qmc  # type: ignore[import-untyped, unused-ignore]

from gradserve.server.dataplane.gsa.problem import Analysis

__all__ = ["Seeds", "seeds_for", "draw", "from_unit"]


class Seeds:
    """Independent seeds of the sampler and of the bootstrap, from one request seed."""

    def __init__(self, seed: int | None) -> None:
        sequence = np.random.SeedSequence(seed)
        sampler, bootstrap = sequence.spawn(2)
        self.sampler = np.random.default_rng(sampler)
        # SALib's Sobol' analysis reads a falsy seed as "no seed": keep it positive.
        self.bootstrap = int(bootstrap.generate_state(1)[0]) % (2**31 - 2) + 1


def seeds_for(analysis: Analysis) -> Seeds:
    return Seeds(analysis.seed)


def from_unit(u: np.ndarray, analysis: Analysis) -> np.ndarray:
    """Map points of the unit hypercube (n, D) to the factors' distributions (inverse CDFs).

    Uniform factors map as SALib's ``scale_samples`` does (``u * (high - low) + low``), so our
    samples equal SALib's bit for bit.
    """
    x = np.empty_like(u, dtype=np.float64)
    for j, f in enumerate(analysis.factors):
        p = f.params
        if f.dist == "unif":
            x[:, j] = u[:, j] * (p[1] - p[0]) + p[0]
        elif f.dist == "norm":
            x[:, j] = stats.norm.ppf(u[:, j], loc=p[0], scale=p[1])
        elif f.dist == "lognorm":
            x[:, j] = np.exp(stats.norm.ppf(u[:, j], loc=p[0], scale=p[1]))
        else:  # triang: from p[0] to p[1], the peak at the fraction p[2] of the way
            x[:, j] = stats.triang.ppf(u[:, j], c=p[2], loc=p[0], scale=p[1] - p[0])
    return x


def draw(analysis: Analysis, seeds: Seeds) -> np.ndarray:
    """The sample matrix (evaluations, D) of ``analysis``, in SALib's row order."""
    d = analysis.dimension
    with warnings.catch_warnings():
        # scipy warns when N is not a power of 2 (the balance of the Sobol' sequence); allowed.
        warnings.simplefilter("ignore", UserWarning)
        if analysis.method == "sobol":
            from SALib.sample import sobol  # type: ignore[import-untyped, unused-ignore]

            unit = {"num_vars": d, "names": analysis.names, "bounds": [[0.0, 1.0]] * d}
            u = sobol.sample(unit, analysis.samples, calc_second_order=analysis.second_order, scramble=True,
                             seed=seeds.sampler)
            return from_unit(u, analysis)
        if analysis.method == "dgsm":
            u = qmc.Sobol(d=d, scramble=True, seed=seeds.sampler).random(analysis.samples)
            return from_unit(u, analysis)
        from SALib.sample import morris  # type: ignore[import-untyped, unused-ignore]

        return np.asarray(morris.sample(analysis.salib_problem(), analysis.samples, num_levels=analysis.levels,
                                        seed=seeds.sampler), dtype=np.float64)

"""Sample matrices of the analyses, equal to SALib's samplers' bit for bit, drawn a range of rows at a time.

The sample matrix of an analysis is never made whole where it need not be. A ``Sampler`` gives
any range of its rows (``rows(start, stop)``), so the evaluation draws each chunk just before it
runs and the memory of an analysis does not grow with evaluations x factors:

- Sobol' (``SobolSampler``): SALib's ``sobol.sample`` draws N scrambled Sobol' points of
  dimension 2D (the "base": matrices A and B side by side) and expands them, in a loop of Python
  over every element, into Saltelli's N (D + 2) (or N (2D + 2)) rows: A, A with column j from B
  for each j, (B with column j from A,) B. The base is small (N x 2D); the rows of any range are
  that expansion, vectorised. SALib's loop took 27 s for a 1024-factor second-order problem
  with N = 31 and could not be stopped.
- DGSM (``DgsmSampler``): N scrambled Sobol' points, drawn on from where the last range ended.
- Morris (``MorrisSampler``): SALib's ``morris.sample`` draws its trajectories one by one with
  three (D + 1) x D x D matrix products each (0.8 s per trajectory at D = 1024); the same
  trajectories from the same random draws take O(D^2) (``trajectory``). Morris's analysis needs
  the whole matrix, which the sampler keeps (``x``; its size is in the memory estimate).

Every sampler is a pure function of the analysis and its seed: the rows of a range never depend
on the ranges drawn before, so how the evaluations are chunked never changes the answer.
``check`` (the call's control) is called between slices of every draw.
"""
from __future__ import annotations

import copy
import threading
import warnings
from typing import Callable

import numpy as np
from scipy import stats  # type: ignore[import-untyped, unused-ignore]
from scipy.stats import qmc  # type: ignore[import-untyped, unused-ignore]

from gradserve.server.dataplane.gsa.problem import SLICE_ELEMENTS, Analysis

__all__ = ["Seeds", "seeds_for", "Sampler", "SobolSampler", "DgsmSampler", "MorrisSampler", "sampler_for",
           "draw", "from_unit", "trajectory", "morris_delta", "UNIT_FLOOR"]

Check = Callable[[], None]

#: Where a point of the unit cube at exactly 0 is put for the inverse CDFs of unbounded
#: distributions: half of the first cell of scipy's 30-bit Sobol' grid (ppf(0) is -inf).
UNIT_FLOOR = 2.0 ** -31

# scipy warns when the number of Sobol' points drawn so far is not a power of 2 (the balance of
# the sequence). Allowed here; catch_warnings changes process-wide state, so one draw at a time.
_QMC_LOCK = threading.Lock()


def _never() -> None:
    return None


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
    samples equal SALib's bit for bit. A point at exactly 0 of an unbounded distribution is put
    at ``UNIT_FLOOR`` (its inverse CDF at 0 is -inf); ``problem.check`` keeps every sample finite.
    """
    x = np.empty_like(u, dtype=np.float64)
    for j, f in enumerate(analysis.factors):
        p = f.params
        if f.dist == "unif":
            x[:, j] = u[:, j] * (p[1] - p[0]) + p[0]
        elif f.dist == "norm":
            x[:, j] = stats.norm.ppf(np.maximum(u[:, j], UNIT_FLOOR), loc=p[0], scale=p[1])
        elif f.dist == "lognorm":
            x[:, j] = np.exp(stats.norm.ppf(np.maximum(u[:, j], UNIT_FLOOR), loc=p[0], scale=p[1]))
        else:  # triang: from p[0] to p[1], the peak at the fraction p[2] of the way
            x[:, j] = stats.triang.ppf(u[:, j], c=p[2], loc=p[0], scale=p[1] - p[0])
    return x


class _SobolPoints:
    """Scrambled Sobol' points of dimension ``d``, drawn on in order, as ``qmc.Sobol.random`` draws them."""

    def __init__(self, d: int, seed: np.random.Generator) -> None:
        self._d = d
        self._seed = seed
        self._engine: qmc.Sobol | None = None
        self.position = 0

    def take(self, n: int, check: Check = _never) -> np.ndarray:
        if self._engine is None:  # built on first use: its scrambling draws from the seed
            self._engine = qmc.Sobol(d=self._d, scramble=True, seed=self._seed)
        out = np.empty((n, self._d), np.float64)
        step = max(1, SLICE_ELEMENTS // self._d)
        for start in range(0, n, step):
            check()
            stop = min(n, start + step)
            with _QMC_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out[start:stop] = self._engine.random(stop - start)
        self.position += n
        return out


class Sampler:
    """The rows of an analysis' sample matrix (``rows``), in SALib's order."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.total = analysis.evaluations

    def rows(self, start: int, stop: int, check: Check = _never) -> np.ndarray:
        """Rows ``start:stop`` (stop - start, D), in the factors' distributions."""
        raise NotImplementedError


class SobolSampler(Sampler):
    """Saltelli's rows of SALib's ``sobol.sample``, from its base points (see the module docstring)."""

    def __init__(self, analysis: Analysis, seeds: Seeds, check: Check = _never) -> None:
        super().__init__(analysis)
        d = analysis.dimension
        self.step = 2 * d + 2 if analysis.second_order else d + 2
        # SALib: qmc.Sobol(d=2D, scramble=True, seed=seed).random(N), then scale_samples to the
        # unit bounds (u * 1 + 0, the same numbers).
        self.base = _SobolPoints(2 * d, seeds.sampler).take(analysis.samples, check)

    def rows(self, start: int, stop: int, check: Check = _never) -> np.ndarray:
        check()
        d = self.analysis.dimension
        index = np.arange(start, stop)
        sample, position = np.divmod(index, self.step)
        a = self.base[sample, :d]
        b = self.base[sample, d:]
        # Position 0 is A; 1..D A with column p-1 from B; D+1..2D (second order) B with column
        # p-1-D from A; the last B.
        from_b = position > d
        u = np.where(from_b[:, None], b, a)
        cross = (position >= 1) & (position <= d)
        rows = np.flatnonzero(cross)
        u[rows, position[rows] - 1] = b[rows, position[rows] - 1]
        if self.analysis.second_order:
            rows = np.flatnonzero(from_b & (position <= 2 * d))
            u[rows, position[rows] - 1 - d] = a[rows, position[rows] - 1 - d]
        return from_unit(u, self.analysis)


class DgsmSampler(Sampler):
    """N scrambled Sobol' points (``qmc.Sobol(d=D).random(N)``), drawn a range at a time."""

    def __init__(self, analysis: Analysis, seeds: Seeds) -> None:
        super().__init__(analysis)
        # The engine's scrambling draws from (and scipy may spawn of) the generator when it is
        # built: every restart starts from a copy of it as it is now (state and seed sequence).
        self._origin = copy.deepcopy(seeds.sampler)
        self._points = _SobolPoints(analysis.dimension, copy.deepcopy(self._origin))

    def rows(self, start: int, stop: int, check: Check = _never) -> np.ndarray:
        if start != self._points.position:  # not where the last range ended: from the start again
            self._points = _SobolPoints(self.analysis.dimension, copy.deepcopy(self._origin))
            if start:
                self._points.take(start, check)
        return from_unit(self._points.take(stop - start, check), self.analysis)


def morris_delta(levels: int) -> float:
    """SALib's Morris step, ``_compute_delta``."""
    return levels / (2.0 * (levels - 1))


def trajectory(d: int, levels: int, rng: np.random.Generator) -> np.ndarray:
    """One Morris trajectory (D + 1, D) in the unit cube, equal to SALib's ``_generate_trajectory``
    for D ungrouped factors, from the same draws of ``rng``, in O(D^2).

    SALib builds ``x* + delta/2 ((2 B (G P*)^T - J) D* + J)`` with B the strictly lower
    triangle of ones, G the identity, P* a permutation and D* a diagonal of signs; every entry of
    the products is a sum of zeros and one +-1 or 2, so computing them entry by entry gives the
    same floats.
    """
    delta = morris_delta(levels)
    # The same draws in the same order: rows of the identity shuffled (P*), the signs, x*.
    order = np.arange(d)
    rng.shuffle(order)  # P*[a] = e_order[a]
    signs = rng.choice([-1, 1], d)
    x_star = np.zeros((1, d))
    grid = np.linspace(0, 1 - delta, int(levels / 2))
    x_star[0, :] = rng.choice(grid, d)
    # (2 B P*^T)[i, a] = 2 if order[a] < i else 0; minus J, times D*: (c - 1) * sign.
    c = np.where(order[None, :] < np.arange(d + 1)[:, None], 2.0, 0.0)
    element_d = (c - 1.0) * signs.astype(np.float64)[None, :]
    out: np.ndarray = (1.0 * x_star) + (delta / 2.0) * (element_d + 1.0)
    return out


class MorrisSampler(Sampler):
    """SALib's ``morris.sample`` rows: trajectories drawn in order as far as asked, and kept (``x``)."""

    def __init__(self, analysis: Analysis, seeds: Seeds) -> None:
        super().__init__(analysis)
        from SALib.util import handle_seed  # type: ignore[import-untyped, unused-ignore]

        self._rng = handle_seed(seeds.sampler)  # SALib's sample() draws from a generator spawned of it
        d = analysis.dimension
        self.x = np.empty((analysis.evaluations, d), np.float64)
        self._drawn = 0  # rows of x drawn so far (whole trajectories)

    def _draw_to(self, stop: int, check: Check) -> None:
        a = self.analysis
        d = a.dimension
        size = d + 1
        per_slice = max(1, SLICE_ELEMENTS // (size * d))
        while self._drawn < stop:
            check()
            count = min(per_slice, (a.evaluations - self._drawn) // size)
            unit = np.concatenate([trajectory(d, a.levels, self._rng) for _ in range(count)])
            rows = slice(self._drawn, self._drawn + count * size)
            self.x[rows] = from_unit(unit, a)
            self._drawn = rows.stop

    def rows(self, start: int, stop: int, check: Check = _never) -> np.ndarray:
        self._draw_to(stop, check)
        return self.x[start:stop]


def sampler_for(analysis: Analysis, seeds: Seeds, check: Check = _never) -> Sampler:
    """The sampler of ``analysis`` (Sobol' draws its base points here, checking between slices)."""
    if analysis.method == "sobol":
        return SobolSampler(analysis, seeds, check)
    if analysis.method == "dgsm":
        return DgsmSampler(analysis, seeds)
    return MorrisSampler(analysis, seeds)


def draw(analysis: Analysis, seeds: Seeds) -> np.ndarray:
    """The whole sample matrix (evaluations, D) of ``analysis``, in SALib's row order."""
    return sampler_for(analysis, seeds).rows(0, analysis.evaluations)

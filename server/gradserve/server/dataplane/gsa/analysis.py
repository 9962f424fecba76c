"""Indices from model outputs (and gradients): SALib's estimators in bounded slices, and DGSM.

Sobol' and Morris give SALib's numbers bit for bit on the same samples (``sobol.analyze`` and
``morris.analyze``), without SALib's whole-matrix temporaries: its Sobol' bootstrap indexes
every output column with an N x resamples index matrix at once (A[r], B[r], AB[r, j], and the
products of them), 5.2 GB at N = 671,088 with 100 resamples, and loops over the D (D - 1) / 2
pairs of second-order indices one at a time (minutes at D = 1024); its Morris bootstrap draws a
resamples x N index matrix per factor. Here the same random draws come in slices of rows (the
generator's stream does not depend on how it is cut), the estimators run on slices of resample
columns (SALib's own ``first_order`` and ``total_order``, or the same arithmetic on several
factor pairs at once), and every reduction runs along the same axis in the same order as in
SALib, so every float is the same. ``check`` (the call's control) is called between slices.

SALib's DGSM takes finite differences of N * (D + 1) evaluations; here the derivatives come from
N gradient evaluations by autodiff, and the measures follow SALib's definitions: ``vi`` is the
mean of (df/dx_i)^2, ``vi_std`` its standard deviation (ddof 0), and ``dgsm`` = vi * (high -
low)^2 / (pi^2 * Var(f)). ``dgsm_conf`` is the half-width of a bootstrap interval of ``dgsm``
itself (SALib resamples ``vi`` only and scales the interval of ``vi``).

Outputs far from 1 in magnitude (beyond 2^+-480) are scaled by a power of two first, which
changes no digit of a scale-free index (Sobol') and is undone on the others, so that squares and
sums of squares neither overflow nor underflow.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats  # type: ignore[import-untyped, unused-ignore]

from gradserve.server.core.errors import FailedPreconditionError
from gradserve.server.dataplane.gsa.problem import SLICE_ELEMENTS, Analysis
from gradserve.server.dataplane.gsa.sampling import morris_delta

__all__ = ["check_outputs", "output_moments", "sobol_indices", "morris_measures", "dgsm_measures",
           "elementary_effects"]

Check = Callable[[], None]

_EPS = float(np.finfo(float).eps)
#: Outputs are rescaled (by a power of two) when their largest magnitude is outside
#: [2^-EXPONENT, 2^EXPONENT]: squares of 4M of them still sum within float64.
_SAFE_EXPONENT = 480


def _never() -> None:
    return None


def _exponent(y: np.ndarray) -> int:
    """The power of two to divide ``y`` by so that its squares are safe (0: leave it as it is)."""
    top = float(np.max(np.abs(y))) if y.size else 0.0
    if top == 0.0 or 2.0 ** -_SAFE_EXPONENT <= top <= 2.0 ** _SAFE_EXPONENT:
        return 0
    return int(np.frexp(top)[1])


def _rescaled(y: np.ndarray) -> tuple[np.ndarray, int]:
    e = _exponent(y)
    return (np.ldexp(y, -e) if e else y), e


def output_moments(y: np.ndarray) -> tuple[float, float]:
    """Mean and variance of the outputs, computed at a safe scale: a variance beyond float64 is
    inf (or 0), not an overflow on the way."""
    scaled, e = _rescaled(y)
    with np.errstate(over="ignore", under="ignore"):
        return float(np.ldexp(np.mean(scaled), e)), float(np.ldexp(np.var(scaled), 2 * e))


def check_outputs(y: np.ndarray, bad_gradients: int = 0) -> None:
    """Refuse outputs that no index can be computed from (non-finite, or constant);
    ``bad_gradients``: samples whose gradient was NaN or Inf."""
    bad = int(np.count_nonzero(~np.isfinite(y))) + bad_gradients
    if bad:
        raise FailedPreconditionError(f"model: the output (or its gradient) is NaN or Inf at {bad} of {len(y)} "
                                      "samples; narrow the bounds to where the model is finite")
    if not np.var(_rescaled(y)[0]) > 0:
        raise FailedPreconditionError("model: the output does not vary over the samples (variance 0); "
                                      "its sensitivity indices are undefined")


def _column_slices(rows: int, columns: int) -> list[tuple[int, int]]:
    """Slices of about SLICE_ELEMENTS (rows x width) of ``columns`` columns, each at least two
    wide: numpy reduces a two-dimensional array over axis 0 row after row in every column (as
    SALib's whole bootstrap matrix is), but one column alone pairwise."""
    width = min(columns, max(2, SLICE_ELEMENTS // max(1, rows)))
    bounds = list(range(0, columns, width)) + [columns]
    slices = list(zip(bounds[:-1], bounds[1:]))
    if len(slices) > 1 and slices[-1][1] - slices[-1][0] < 2:
        slices[-2:] = [(slices[-2][0], columns)]
    return slices


def _bootstrap_index(n: int, resamples: int, seed: int, check: Check) -> np.ndarray:
    """SALib's ``default_rng(seed).integers(N, size=(N, resamples))``, drawn in slices of rows."""
    gen = np.random.default_rng(seed)
    r = np.empty((n, resamples), np.int32 if n < 2**31 else np.int64)
    step = max(1, SLICE_ELEMENTS // resamples)
    for start in range(0, n, step):
        check()
        stop = min(n, start + step)
        r[start:stop] = gen.integers(n, size=(stop - start, resamples))
    return r


def sobol_indices(analysis: Analysis, y: np.ndarray, seed: int, check: Check = _never) -> dict[str, np.ndarray]:
    """S1, S1_conf, ST, ST_conf (and S2, S2_conf): SALib's ``sobol.analyze`` of ``y`` with
    ``seed``, the same floats, in slices (see the module docstring)."""
    from SALib.analyze import sobol as salib  # type: ignore[import-untyped, unused-ignore]

    d, n, count = analysis.dimension, analysis.samples, analysis.resamples
    second = analysis.second_order
    y = _rescaled(y)[0]  # the indices do not change when y is scaled by a power of two
    centred = (y - y.mean()) / y.std()
    a, b, ab, ba = salib.separate_output_values(centred, d, n, second)
    z = float(stats.norm.ppf(0.5 + analysis.conf_level / 2))
    s1, st = np.zeros(d), np.zeros(d)
    for j in range(d):
        if j % 64 == 0:
            check()
        s1[j] = salib.first_order(a, ab[:, j], b)
        st[j] = salib.total_order(a, ab[:, j], b)

    r = _bootstrap_index(n, count, seed, check)
    slices = _column_slices(n, count)
    s1_boot = np.empty((d, count))
    st_boot = np.empty((d, count))
    y_var = np.empty(count)  # variance of each resample of [A; B]
    low, high = np.inf, -np.inf
    for start, stop in slices:
        check()
        rows = r[:, start:stop]
        ar, br = a[rows], b[rows]
        low, high = min(low, ar.min(), br.min()), max(high, ar.max(), br.max())
        both = np.r_[ar, br]
        flat = np.ptp(both) <= _EPS  # SALib's first_order returns 0 here (with a warning)
        y_var[start:stop] = np.var(both, axis=0)
        del both
        for j in range(d):
            check()
            if flat:
                s1_boot[j, start:stop] = 0.0
                st_boot[j, start:stop] = 0.0
                continue
            abj = ab[:, j][rows]
            s1_boot[j, start:stop] = salib.first_order(ar, abj, br)
            st_boot[j, start:stop] = salib.total_order(ar, abj, br)
    spread = high - low  # SALib's np.ptp(np.r_[A[r], B[r]])
    s1_conf = np.array([z * s1_boot[j].std(ddof=1) if spread != 0.0 else 0.0 for j in range(d)])
    st_conf = np.array([z * st_boot[j].std(ddof=1) if spread != 0.0 else 0.0 for j in range(d)])
    out = {"S1": s1, "S1_conf": s1_conf, "ST": st, "ST_conf": st_conf}
    if second:
        del st_boot
        out["S2"], out["S2_conf"] = _second_order(a, b, ab, ba, s1, s1_boot, y_var, r, slices, z, check)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _second_order(a: np.ndarray, b: np.ndarray, ab: np.ndarray, ba: np.ndarray, s1: np.ndarray,
                  s1_boot: np.ndarray, y_var: np.ndarray, r: np.ndarray, slices: list[tuple[int, int]], z: float,
                  check: Check) -> tuple[np.ndarray, np.ndarray]:
    """SALib's ``second_order`` for every pair j < k, and Z times the standard deviation of its
    bootstrap, several pairs at once: V_jk = mean(BA_j AB_k - A B) / Var[A; B], S2 = V_jk - S1_j - S1_k."""
    n, d = ab.shape
    count = r.shape[1]
    s2 = np.full((d, d), np.nan)
    s2_conf = np.full((d, d), np.nan)
    # Point estimates: one row per pair, reduced along the row as SALib reduces its 1-D arrays.
    whole = np.r_[a, b]
    flat = np.ptp(whole) <= _EPS
    var = np.var(whole, axis=0)
    a_b = a * b
    pairs = max(1, SLICE_ELEMENTS // max(1, n))
    for j in range(d - 1):
        for k0 in range(j + 1, d, pairs):
            check()
            k1 = min(d, k0 + pairs)
            if flat:
                s2[j, k0:k1] = 0.0
                continue
            abk = np.ascontiguousarray(ab[:, k0:k1].T)
            v = np.mean(ba[:, j][None, :] * abk - a_b[None, :], axis=1)
            v = np.divide(v, var, out=np.zeros_like(v), where=var > _EPS)
            s2[j, k0:k1] = v - s1[j] - s1[k0:k1]
    # Bootstrap: for a block of pairs, every slice of resample columns, then the deviation over
    # all resamples of each pair.
    single = len(slices) == 1
    cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for j in range(d - 1):
        width = max(stop - start for start, stop in slices)
        pairs = max(1, min(SLICE_ELEMENTS // max(1, n * width), SLICE_ELEMENTS // count))
        for k0 in range(j + 1, d, pairs):
            k1 = min(d, k0 + pairs)
            values = np.empty((k1 - k0, count))
            for start, stop in slices:
                check()
                if single and cached is not None:
                    rows, ar_br, yv = cached
                else:
                    rows = r[:, start:stop]
                    ar_br = a[rows] * b[rows]
                    yv = y_var[start:stop]
                    if single:
                        cached = (rows, ar_br, yv)
                baj = ba[:, j][rows]  # (n, columns)
                abk = ab[:, k0:k1][rows]  # (n, columns, pairs)
                v = np.mean(baj[:, :, None] * abk - ar_br[:, :, None], axis=0)  # (columns, pairs)
                del abk
                v = np.divide(v, yv[:, None], out=np.zeros_like(v), where=(yv > _EPS)[:, None])
                values[:, start:stop] = ((v - s1_boot[j, start:stop][:, None]) - s1_boot[k0:k1, start:stop].T).T
            s2_conf[j, k0:k1] = z * values.std(axis=1, ddof=1)
    return s2, s2_conf


def elementary_effects(x: np.ndarray, y: np.ndarray, d: int, delta: float) -> np.ndarray:
    """Morris elementary effects (trajectories, D) of whole trajectories ``x`` ((D + 1) T, D) and
    ``y``, as SALib's ``_compute_elementary_effects`` computes them: for each factor, the output
    after its step minus the output before, over delta, signed by the step's direction."""
    size = d + 1
    t = len(x) // size
    steps = np.diff(x.reshape(t, size, d), axis=1)  # (T, D, D): step k of factor j
    moved = steps != 0
    k = np.argmax(moved, axis=1)  # (T, D): the step at which each factor moves
    up = np.take_along_axis(steps, k[:, None, :], axis=1)[:, 0, :] > 0
    changed = moved.any(axis=1)
    del steps, moved
    ys = y.reshape(t, size)
    before = np.take_along_axis(ys, k, axis=1)
    after = np.take_along_axis(ys, k + 1, axis=1)
    # SALib sums the output over masks with one entry set; a factor that never moves gets 0 - 0.
    high = np.where(changed, np.where(up, after, before), 0.0)
    low = np.where(changed, np.where(up, before, after), 0.0)
    effects: np.ndarray = (high - low) / delta
    return effects


def morris_measures(analysis: Analysis, x: np.ndarray, y: np.ndarray, seed: int,
                    check: Check = _never) -> dict[str, np.ndarray]:
    """mu, mu_star, sigma, mu_star_conf: SALib's ``morris.analyze`` of ``x``, ``y`` with ``seed``,
    the same floats, in slices."""
    d, n, count = analysis.dimension, analysis.samples, analysis.resamples
    size = d + 1
    y, e = _rescaled(y)
    delta = morris_delta(analysis.levels)
    # SALib's effects are the transpose of a (T, D) array: (D, T) in Fortran order, which the
    # reductions below go through in the same order as SALib's.
    ee = np.empty((n, d)).T
    per_slice = max(1, SLICE_ELEMENTS // (size * d))
    for t0 in range(0, n, per_slice):
        check()
        t1 = min(n, t0 + per_slice)
        ee[:, t0:t1] = elementary_effects(x[t0 * size:t1 * size], y[t0 * size:t1 * size], d, delta).T
    mu = np.average(ee, 1)
    mu_star = np.average(np.abs(ee), 1)
    sigma = np.std(ee, axis=1, ddof=1)
    # SALib: per factor, rng.integers(N, size=(resamples, N)), one generator for all factors.
    rng = np.random.default_rng(seed)
    z = float(stats.norm.ppf(0.5 + analysis.conf_level / 2))
    conf = np.empty(d)
    step = max(1, SLICE_ELEMENTS // max(1, n))  # resamples per slice
    for j in range(d):
        effects = ee[j, :]
        resampled = np.empty(count)
        for start in range(0, count, step):
            check()
            stop = min(count, start + step)
            index = rng.integers(n, size=(stop - start, n))
            resampled[start:stop] = np.average(np.abs(effects[index]), axis=1)
        conf[j] = z * resampled.std(ddof=1)
    out = {"mu": mu, "mu_star": mu_star, "sigma": sigma, "mu_star_conf": conf}
    return {k: (np.ldexp(v, e) if e else np.asarray(v, dtype=np.float64)) for k, v in out.items()}


def dgsm_measures(analysis: Analysis, gradients: np.ndarray, y: np.ndarray, seed: int,
                  check: Check = _never) -> dict[str, np.ndarray]:
    """vi, vi_std, dgsm and dgsm_conf from gradients (N, D) and outputs ``y`` (N,). ``gradients``
    is overwritten (with its scaled squares).

    Each factor's gradients, and the outputs, are scaled by a power of two where their squares
    would overflow or underflow, and dgsm = vi (high - low)^2 / (pi^2 Var f) is computed as
    (sqrt(vi) (high - low) / sd f)^2 / pi^2 from the scaled terms, so that it is right wherever
    it is a float64 (bounds of 1e160 squared are not, nor vi of gradients of 1e200; that vi is
    inf, its dgsm not).
    """
    n, d = gradients.shape
    exponents = np.array([_exponent(gradients[:, j]) for j in range(d)], np.int32)
    step = max(1, SLICE_ELEMENTS // d)
    for start in range(0, n, step):  # in place: gradients -> scaled squares
        check()
        block = gradients[start:start + step]
        if exponents.any():
            np.ldexp(block, -exponents, out=block)
        np.square(block, out=block)
    squares = gradients
    mean = squares.mean(axis=0)  # vi / 4^exponents
    spread = np.zeros(d)
    for start in range(0, n, step):
        check()
        spread += np.square(squares[start:start + step] - mean).sum(axis=0)
    with np.errstate(over="ignore", under="ignore"):  # beyond float64: inf (or 0), as the true value rounds
        vi = np.ldexp(mean, 2 * exponents)
        vi_std = np.ldexp(np.sqrt(spread / n), 2 * exponents)
    width = np.array([f.params[1] - f.params[0] for f in analysis.factors])  # finite (problem.check)
    ys, e = _rescaled(y)

    def measure(mean_squares: np.ndarray, sd_scaled: float) -> np.ndarray:
        # sqrt(vi) / sd f * width = sqrt(mean_squares) / sd_scaled * 2^(exponents - e) * width
        ratio: np.ndarray = np.square(np.ldexp(np.sqrt(mean_squares) / sd_scaled, exponents - e) * width) / np.pi**2
        return ratio

    dgsm = measure(mean, float(np.std(ys)))
    rng = np.random.default_rng(seed)
    boot = np.empty((analysis.resamples, d))
    for k in range(analysis.resamples):
        check()
        counts = np.bincount(rng.integers(n, size=n), minlength=n).astype(np.float64)
        centre = counts @ ys / n
        var = counts @ np.square(ys - centre) / n
        boot[k] = measure(counts @ squares / n, float(np.sqrt(var))) if var > 0 else np.nan
    z = stats.norm.ppf(0.5 + analysis.conf_level / 2)
    conf = z * np.nanstd(boot, axis=0, ddof=1)
    return {"vi": vi, "vi_std": vi_std, "dgsm": dgsm, "dgsm_conf": np.asarray(conf, dtype=np.float64)}

"""Coalitions of features: Kernel SHAP's sampling design, and every coalition for exact values.

Kernel SHAP (Lundberg and Lee, 2017) fits the Shapley values as the coefficients of a weighted
linear regression over coalitions z (which features come from the explained row), weighted with
the Shapley kernel

    pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|)).

The design follows the ``shap`` library's KernelExplainer: the kernel's mass is spread over subset
sizes 1..M-1 (a size s and its complement M - s as one pair); sizes are enumerated whole, in order
of decreasing per-coalition weight (1 and M - 1 first), while the budget covers every coalition
of the size and its complements; the rest of the budget is drawn at random in complementary
pairs (paired sampling), a coalition drawn twice counting twice. With ``samples >= 2**M - 2``
every coalition but the empty and the full one is enumerated and the regression gives the exact
Shapley values.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Coalitions", "default_samples", "coalition_count", "kernel_coalitions", "every_coalition"]

#: Kernel SHAP's default budget beyond 2M (the ``shap`` library's ``nsamples="auto"``).
AUTO_SAMPLES = 2048


@dataclass(frozen=True, eq=False)
class Coalitions:
    """Coalitions and their regression weights.

    ``masks[k, i]`` is True when feature ``i`` takes the explained row's value in coalition
    ``k`` (else the background row's); the empty and the full coalition are never included (their
    values are E[f(background)] and f(x)). ``complete``: every other coalition is included.
    """

    masks: np.ndarray
    weights: np.ndarray
    complete: bool

    def __len__(self) -> int:
        return len(self.masks)


def default_samples(features: int) -> int:
    """Kernel SHAP's default number of coalitions for ``features`` features: 2M + 2048."""
    return 2 * features + AUTO_SAMPLES


def coalition_count(features: int, samples: int) -> int:
    """How many coalitions ``kernel_coalitions`` returns at most: ``samples``, or every coalition
    but the empty and the full one when fewer."""
    if features <= 1:
        return 0
    return min(samples, (1 << features) - 2)


def _size_weights(m: int) -> tuple[np.ndarray, int, int]:
    """The kernel's mass per subset size 1..ceil((M-1)/2), a size and its complement together."""
    sizes = int(math.ceil((m - 1) / 2.0))
    paired = int(math.floor((m - 1) / 2.0))
    weights = np.array([(m - 1.0) / (s * (m - s)) for s in range(1, sizes + 1)])
    weights[:paired] *= 2
    return weights / weights.sum(), sizes, paired


def kernel_coalitions(features: int, samples: int, rng: np.random.Generator) -> Coalitions:
    """Kernel SHAP's coalitions of ``features`` features within a budget of ``samples``
    (see the module docstring)."""
    m = features
    if m <= 1:
        return Coalitions(np.zeros((0, m), bool), np.zeros(0), True)
    budget = coalition_count(m, samples)
    size_weights, sizes, paired = _size_weights(m)
    masks: list[np.ndarray] = []
    weights: list[float] = []
    left = budget
    remaining = size_weights.copy()
    full_sizes = 0
    for s in range(1, sizes + 1):
        count = math.comb(m, s) * (2 if s <= paired else 1)
        if left * remaining[s - 1] / count < 1.0 - 1e-8:
            break
        full_sizes += 1
        left -= count
        if remaining[s - 1] < 1.0:
            remaining /= 1.0 - remaining[s - 1]
        w = size_weights[s - 1] / math.comb(m, s) / (2.0 if s <= paired else 1.0)
        subsets = np.zeros((math.comb(m, s), m), bool)
        for row, members in enumerate(itertools.combinations(range(m), s)):
            subsets[row, members] = True
        if s <= paired:   # each subset followed by its complement
            subsets = np.stack([subsets, ~subsets], axis=1).reshape(-1, m)
        masks.append(subsets)
        weights.extend([w] * len(subsets))
    fixed = sum(len(b) for b in masks)
    drawn: list[np.ndarray] = []
    if full_sizes < sizes and left > 0:
        drawn, counts = _draw(m, left, size_weights, full_sizes, paired, rng)
        weight_left = float(size_weights[full_sizes:].sum())
        weights.extend((np.asarray(counts, np.float64) * (weight_left / sum(counts))).tolist())
    all_masks = np.concatenate(masks + ([np.stack(drawn)] if drawn else []), axis=0) if masks or drawn \
        else np.zeros((0, m), bool)
    assert len(all_masks) == fixed + len(drawn) == len(weights)
    return Coalitions(all_masks, np.asarray(weights, np.float64), full_sizes == sizes)


def _draw(m: int, left: int, size_weights: np.ndarray, full_sizes: int, paired: int,
          rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """``left`` distinct coalitions of the sizes not enumerated, drawn in complementary pairs
    with probabilities from the kernel; a coalition drawn again counts again (at most 4 draws
    per coalition wanted, as ``shap`` does)."""
    p = size_weights.copy()
    p[:paired] /= 2   # each draw of a paired size brings its complement too
    p = p[full_sizes:] / p[full_sizes:].sum()
    draws = 4 * left
    block = max(1, (1 << 20) // m)   # random permutations drawn this many at a time (8 MiB)
    seen: dict[bytes, int] = {}
    masks: list[np.ndarray] = []
    counts: list[int] = []
    for d in range(draws):
        if left <= 0:
            break
        if d % block == 0:
            sizes = rng.choice(len(p), min(block, draws - d), p=p) + full_sizes + 1
            order = np.argsort(rng.random((len(sizes), m)), axis=1)   # a random permutation per draw
        s = int(sizes[d % block])
        mask = np.zeros(m, bool)
        mask[order[d % block, :s]] = True
        key = mask.tobytes()
        at = seen.get(key)
        if at is None:
            seen[key] = len(masks)
            masks.append(mask)
            counts.append(1)
            left -= 1
            if left > 0 and s <= paired:
                masks.append(~mask)
                counts.append(1)
                left -= 1
        else:
            counts[at] += 1
            if s <= paired and at + 1 < len(counts):
                counts[at + 1] += 1   # its complement follows it
    return masks, counts


def every_coalition(features: int) -> np.ndarray:
    """All ``2**M`` coalitions, row ``b`` holding feature ``i`` when bit ``i`` of ``b`` is set."""
    b = np.arange(2 ** features, dtype=np.int64)[:, None]
    return ((b >> np.arange(features, dtype=np.int64)) & 1).astype(bool)

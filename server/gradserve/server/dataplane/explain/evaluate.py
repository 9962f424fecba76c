"""The model evaluations of each explanation algorithm, built and reduced chunk by chunk.

An algorithm's evaluations are a long list of model input rows (explained row x coalition x
background row, explained row x path point, grid point x row), never held in memory at once: each
chunk of ``chunk_rows`` rows is built (on a worker thread), sent to the engine through the
injected ``predict`` or ``gradient`` function, and reduced into the answer's accumulators as it
comes back. The next chunk is built while the engine computes the current one (two chunks in
flight), and ``check`` (the call's deadline and cancellation) runs before every chunk.

``predict(inputs)`` returns the explained output head for the rows of ``inputs`` (model input
name -> ``(rows, *shape)``); ``gradient(inputs, indices)`` returns d target / d input of each
input for the rows, with the target index of each row (None for a sum target).
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve.server.dataplane.explain import coalitions as _coalitions
from gradserve.server.dataplane.explain import paths as _paths
from gradserve.server.dataplane.explain import targets as _targets
from gradserve.server.dataplane.explain.features import Features
from gradserve.server.dataplane.explain.grid import cartesian
from gradserve.server.dataplane.explain.shapley import exact_shapley, kernel_shapley

__all__ = ["Batch", "ShapProblem", "ShapResult", "PartialDependenceProblem", "PartialDependenceResult",
           "Predict", "Gradient", "Check", "shap_values", "partial_dependence", "ALGORITHMS"]

Predict = Callable[[dict[str, np.ndarray]], Awaitable[np.ndarray]]
Gradient = Callable[[dict[str, np.ndarray], "np.ndarray | None"], Awaitable[dict[str, np.ndarray]]]
Check = Callable[[], None]

#: Shapley algorithms: every coalition, Kernel SHAP, expected gradients.
ALGORITHMS = ("exact", "kernel", "gradient")
#: Chunks in flight: one computing while the next is built.
WINDOW = 2


@dataclass(frozen=True, eq=False)
class Batch:
    """Rows of every model input, each flattened to ``(rows, elements)`` (C order) in the input's
    dtype, and the shape of one example of each."""

    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, inputs: Mapping[str, np.ndarray]) -> Batch:
        """Model inputs (name -> ``(rows, *shape)``), in the model's input order."""
        return cls({k: np.ascontiguousarray(a).reshape(len(a), -1) for k, a in inputs.items()},
                   {k: tuple(int(d) for d in a.shape[1:]) for k, a in inputs.items()})

    @property
    def rows(self) -> int:
        return int(len(next(iter(self.arrays.values()))))

    @property
    def sizes(self) -> dict[str, int]:
        """Elements per example of each input."""
        return {k: a.shape[1] for k, a in self.arrays.items()}

    def model_inputs(self, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flat rows of every input back to the model's shapes and dtypes."""
        return {k: np.asarray(flat[k]).astype(self.arrays[k].dtype, copy=False).reshape((-1,) + self.shapes[k])
                for k in self.arrays}


@dataclass(frozen=True, eq=False)
class ShapProblem:
    """One Shapley-value request, checked: rows to explain, background rows, features, target."""

    x: Batch
    background: Batch
    features: Features
    target: _targets.Target
    #: "exact", "kernel" or "gradient".
    algorithm: str
    #: Kernel: coalitions per explained row; gradient: path points per explained row; exact: unused.
    samples: int
    seed: int
    #: Also E[f(background)] of each row's target (always known for exact and kernel).
    return_base: bool = False

    def coalitions(self) -> int:
        """Coalitions evaluated per explained row (exact and kernel)."""
        m = self.features.count
        if self.algorithm == "exact":
            return max(0, (1 << m) - 2)
        return _coalitions.coalition_count(m, self.samples)

    @property
    def evaluations(self) -> int:
        """Model evaluations (rows through the model: forward, or gradient for the gradient algorithm)."""
        n, nb = self.x.rows, self.background.rows
        if self.algorithm == "gradient":
            forward = (nb if self.return_base else 0) + (n if self.target.kind == "argmax" else 0)
            return n * self.samples + forward
        return n + nb + n * self.coalitions() * nb


@dataclass(frozen=True, eq=False)
class ShapResult:
    """Shapley values ``(n, features)``, and E[f(background)] of each row's target when computed."""

    values: np.ndarray
    base: np.ndarray | None
    #: The target index of each row ("index" and "argmax" targets), else None.
    indices: np.ndarray | None


async def _drive(total: int, chunk_rows: int, build: Callable[[int, int], Any],
                 compute: Callable[[Any, int, int], Awaitable[Any]], absorb: Callable[[int, int, Any], None],
                 check: Check) -> None:
    """Build, compute and absorb rows ``0..total`` in chunks (see the module docstring)."""
    loop = asyncio.get_running_loop()
    pending: deque[tuple[int, int, asyncio.Future[Any]]] = deque()
    try:
        for start in range(0, total, chunk_rows):
            stop = min(total, start + chunk_rows)
            check()
            inputs = await loop.run_in_executor(None, build, start, stop)
            check()
            pending.append((start, stop, asyncio.ensure_future(compute(inputs, start, stop))))
            if len(pending) >= WINDOW:
                first, last, task = pending.popleft()
                absorb(first, last, await task)
        while pending:
            first, last, task = pending.popleft()
            absorb(first, last, await task)
    finally:
        for _, _, task in pending:
            task.cancel()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


async def _outputs(batch: Batch, predict: Predict, chunk_rows: int, check: Check) -> np.ndarray:
    """The explained output head at every row of ``batch``, float64."""
    parts: dict[int, np.ndarray] = {}

    def build(start: int, stop: int) -> dict[str, np.ndarray]:
        return batch.model_inputs({k: a[start:stop] for k, a in batch.arrays.items()})

    async def compute(inputs: dict[str, np.ndarray], start: int, stop: int) -> np.ndarray:
        return await predict(inputs)

    def absorb(start: int, stop: int, y: np.ndarray) -> None:
        parts[start] = np.asarray(y, np.float64)

    await _drive(batch.rows, chunk_rows, build, compute, absorb, check)
    return np.concatenate([parts[k] for k in sorted(parts)], axis=0)


def _concat(a: Batch, b: Batch) -> Batch:
    return Batch({k: np.concatenate([a.arrays[k], b.arrays[k]]) for k in a.arrays}, a.shapes)


async def shap_values(problem: ShapProblem, predict: Predict, gradient: Gradient | None, *, chunk_rows: int,
                      check: Check) -> ShapResult:
    """Interventional Shapley values of ``problem`` (exact, kernel or gradient)."""
    if problem.algorithm == "gradient":
        assert gradient is not None
        return await _gradient_shap(problem, predict, gradient, chunk_rows, check)
    p = problem
    n, target = p.x.rows, p.target
    loop = asyncio.get_running_loop()
    y = await _outputs(_concat(p.x, p.background), predict, chunk_rows, check)
    indices = _indices(target, y[:n])
    f_x = _targets.values(y[:n], target, indices)
    f_null = _base(y[n:], target, indices, n)
    design = await loop.run_in_executor(None, _design, p)
    v = await _coalition_values(p, design.masks, indices, predict, chunk_rows, check)
    check()
    if p.algorithm == "exact":
        phi = await loop.run_in_executor(None, exact_shapley, np.concatenate([f_null[:, None], v, f_x[:, None]],
                                                                             axis=1))
    else:
        phi = await loop.run_in_executor(None, kernel_shapley, design.masks, design.weights, v, f_x, f_null)
    return ShapResult(phi, f_null, indices)


def _design(p: ShapProblem) -> _coalitions.Coalitions:
    """Every coalition but the empty and the full one (exact), or Kernel SHAP's (kernel)."""
    if p.algorithm == "exact":
        masks = _coalitions.every_coalition(p.features.count)[1:-1]
        return _coalitions.Coalitions(masks, np.ones(len(masks)), True)
    return _coalitions.kernel_coalitions(p.features.count, p.samples, _rng(p.seed))


def _indices(target: _targets.Target, y_x: np.ndarray) -> np.ndarray | None:
    """Each explained row's target index: given ("index"), or the row's own argmax ("argmax")."""
    if target.kind == "argmax":
        return _targets.argmax_indices(y_x, target.transform)
    return target.indices if target.kind == "index" else None


def _base(y_background: np.ndarray, target: _targets.Target, indices: np.ndarray | None, n: int) -> np.ndarray:
    """E[f(background)] of each explained row's target."""
    classes = _targets.per_class(y_background, target.transform)
    if target.kind == "sum" or classes.ndim == 1:
        return np.full(n, _targets.values(y_background, _targets.Target("sum", target.transform)).mean())
    assert indices is not None
    return np.asarray(classes.mean(axis=0)[indices], np.float64)


async def _coalition_values(p: ShapProblem, masks: np.ndarray, indices: np.ndarray | None, predict: Predict,
                            chunk_rows: int, check: Check) -> np.ndarray:
    """v(S) per explained row and coalition ``(n, K)``: the mean over the background rows of f at
    the row's features in S and the background row's elsewhere."""
    n, nb, k_count = p.x.rows, p.background.rows, len(masks)
    totals = np.zeros(n * k_count, np.float64)
    labels = p.features.labels

    def build(start: int, stop: int) -> dict[str, np.ndarray]:
        idx = np.arange(start, stop, dtype=np.int64)
        j, k, b = idx // (k_count * nb), (idx // nb) % k_count, idx % nb
        chosen = masks[k]
        return p.x.model_inputs({name: np.where(chosen[:, labels[name]], x[j], p.background.arrays[name][b])
                                 for name, x in p.x.arrays.items()})

    async def compute(inputs: dict[str, np.ndarray], start: int, stop: int) -> np.ndarray:
        return await predict(inputs)

    def absorb(start: int, stop: int, y: np.ndarray) -> None:
        idx = np.arange(start, stop, dtype=np.int64)
        rows = idx // (k_count * nb)
        values = _targets.values(y, p.target, None if indices is None else indices[rows])
        cell = idx // nb
        totals[cell[0]:cell[-1] + 1] += np.bincount(cell - cell[0], weights=values)

    await _drive(n * k_count * nb, chunk_rows, build, compute, absorb, check)
    return totals.reshape(n, k_count) / nb


async def _gradient_shap(p: ShapProblem, predict: Predict, gradient: Gradient, chunk_rows: int,
                         check: Check) -> ShapResult:
    n, nb = p.x.rows, p.background.rows
    indices = p.target.indices if p.target.kind == "index" else None
    if p.target.kind == "argmax":
        indices = _indices(p.target, await _outputs(p.x, predict, chunk_rows, check))
    base = None
    if p.return_base:
        base = _base(await _outputs(p.background, predict, chunk_rows, check), p.target, indices, n)
    points = _paths.path_points(nb, p.samples, _rng(p.seed))
    s_count = len(points)
    sums = {name: np.zeros(a.shape, np.float64) for name, a in p.x.arrays.items()}

    def locate(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.arange(start, stop, dtype=np.int64)
        s = idx % s_count
        return idx // s_count, points.background[s], points.alphas[s]

    def build(start: int, stop: int) -> dict[str, np.ndarray]:
        j, b, t = locate(start, stop)
        out = {}
        for name, x in p.x.arrays.items():
            base_rows = p.background.arrays[name][b].astype(np.float64)
            out[name] = base_rows + t[:, None] * (x[j] - base_rows)
        return p.x.model_inputs(out)

    async def compute(inputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        j = np.arange(start, stop, dtype=np.int64) // s_count
        return await gradient(inputs, None if indices is None else indices[j])

    def absorb(start: int, stop: int, grads: dict[str, np.ndarray]) -> None:
        j, b, _ = locate(start, stop)
        first = np.flatnonzero(np.diff(j, prepend=-1))
        for name, x in p.x.arrays.items():
            g = np.asarray(grads[name], np.float64).reshape(stop - start, -1)
            term = g * (x[j].astype(np.float64) - p.background.arrays[name][b])
            sums[name][j[first]] += np.add.reduceat(term, first, axis=0)

    await _drive(n * s_count, chunk_rows, build, compute, absorb, check)
    phi = p.features.group_sums({name: total / s_count for name, total in sums.items()})
    return ShapResult(phi, base, indices)


@dataclass(frozen=True, eq=False)
class PartialDependenceProblem:
    """One partial-dependence request, checked: the rows, the features (input name, element
    index) and the grid values of each."""

    x: Batch
    features: tuple[tuple[str, int], ...]
    axes: tuple[np.ndarray, ...]
    target: _targets.Target

    @property
    def points(self) -> int:
        return int(np.prod([len(a) for a in self.axes]))

    @property
    def evaluations(self) -> int:
        return self.x.rows * self.points + (self.x.rows if self.target.kind == "argmax" else 0)


@dataclass(frozen=True, eq=False)
class PartialDependenceResult:
    """``average`` (the grid's shape) and ``individual`` (rows x the grid's shape)."""

    average: np.ndarray
    individual: np.ndarray
    indices: np.ndarray | None


async def partial_dependence(problem: PartialDependenceProblem, predict: Predict, *, chunk_rows: int,
                             check: Check) -> PartialDependenceResult:
    """ICE curves (or surfaces) of every row over the grid, and their mean, the partial dependence."""
    p = problem
    n, points = p.x.rows, p.points
    grid = cartesian(p.axes)
    indices = p.target.indices if p.target.kind == "index" else None
    if p.target.kind == "argmax":
        indices = _indices(p.target, await _outputs(p.x, predict, chunk_rows, check))
    individual = np.zeros(n * points, np.float64)

    def build(start: int, stop: int) -> dict[str, np.ndarray]:
        idx = np.arange(start, stop, dtype=np.int64)
        rows = {name: a[idx // points] for name, a in p.x.arrays.items()}   # copies
        for f, (name, element) in enumerate(p.features):
            rows[name][:, element] = grid[idx % points, f]
        return p.x.model_inputs(rows)

    async def compute(inputs: dict[str, np.ndarray], start: int, stop: int) -> np.ndarray:
        return await predict(inputs)

    def absorb(start: int, stop: int, y: np.ndarray) -> None:
        rows = np.arange(start, stop, dtype=np.int64) // points
        individual[start:stop] = _targets.values(y, p.target, None if indices is None else indices[rows])

    await _drive(n * points, chunk_rows, build, compute, absorb, check)
    shape = tuple(len(a) for a in p.axes)
    ice = individual.reshape((n,) + shape)
    return PartialDependenceResult(ice.mean(axis=0), ice, indices)

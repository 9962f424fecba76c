"""Model evaluations of a sample matrix, in large chunks, through the model version's engine.

Each chunk is one prepared call of the engine's compiled functions (``predict`` for Sobol' and
Morris, ``gradient`` with the outputs of the same pass for DGSM), so the evaluations run on the
device the engine was configured with, in its biggest batches, and are queued with other
callers' work through the server's batcher. The rows of each chunk are drawn from the sampler
just before it runs (off the event loop), and only the outputs are kept (DGSM: and the
gradients with respect to the factors), never the whole sample matrix. The deadline and the
caller's cancellation are checked before every chunk and between the slices of its drawing (and
by the engine between the batches of a chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from gradserve.server.compute import methods
from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import FailedPreconditionError
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, PreparedCall, TargetSpec
from gradserve.server.dataplane.gsa.problem import CHUNK_ELEMENTS, Analysis, elements
from gradserve.server.dataplane.gsa.sampling import Sampler
from gradserve.server.models.repository import ModelVersion

__all__ = ["evaluate", "Evaluations", "chunk_rows_for", "output_values", "CHUNK_ELEMENTS", "MAX_CHUNK_ROWS"]

#: Most rows per chunk (input elements per chunk: ``problem.CHUNK_ELEMENTS``, large enough that
#: the engine runs its biggest batches back to back, small enough for frequent progress and
#: cancellation points).
MAX_CHUNK_ROWS = 1 << 15

Runner = Callable[[ModelVersion, PreparedCall], Awaitable[dict[str, np.ndarray]]]
Progress = Callable[[int, int], Awaitable[None]]
#: Runs a function off the event loop (``run``'s analysis threads) and returns its result.
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class Evaluations:
    """What the analysis needs of the evaluations."""

    #: The analysed value at each row of the sample matrix (evaluations,).
    y: np.ndarray
    #: DGSM: the gradient with respect to each factor at each point (N, D); else None.
    gradients: np.ndarray | None = None
    #: DGSM: points whose gradient was NaN or Inf.
    bad_gradients: int = 0


def chunk_rows_for(analysis: Analysis, bucket: int) -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS`` input elements, a multiple of the engine's biggest
    bucket (so that it never pads inside a chunk), at most ``MAX_CHUNK_ROWS``."""
    width = max(1, sum(elements(s) for s in analysis.inputs.values()))
    rows = min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // width)
    return max(bucket, rows - rows % bucket)


def output_values(analysis: Analysis, outputs: np.ndarray) -> np.ndarray:
    """The analysed value per example: the sum of the output, or one element of its last axis
    (other axes summed), as the gradient method's target takes it."""
    y = np.asarray(outputs, dtype=np.float64)
    if analysis.element is None or y.ndim == 1:
        value: np.ndarray = y.reshape(len(y), -1).sum(axis=1)
    else:
        if y.ndim > 2:
            y = y.sum(axis=tuple(range(1, y.ndim - 1)))
        value = y[:, analysis.element]
    return value


def _prepare(analysis: Analysis, mv: ModelVersion, x: np.ndarray, limits: Limits) -> PreparedCall:
    inputs = analysis.to_inputs(x)
    n = len(x)
    if analysis.method != "dgsm":
        spec = ComputeSpec(mv.name, mv.version, "predict", inputs, n)
    else:
        kind = "sum" if analysis.element is None else "index"
        indices = None if analysis.element is None else np.full(n, analysis.element, np.int64)
        spec = ComputeSpec(mv.name, mv.version, "gradient", inputs, n,
                           target=TargetSpec(analysis.output, kind, indices),
                           wrt=tuple(analysis.inputs), include_outputs=True)
    return methods.get(spec.method).plan(spec, mv.model, limits)


def _gradients(analysis: Analysis, result: dict[str, np.ndarray], rows: int, out: np.ndarray) -> int:
    """Gradients of one chunk into ``out`` (rows, D); the number of rows with a NaN or Inf gradient."""
    bad = np.zeros(rows, bool)
    for name in analysis.inputs:
        columns = [j for j, f in enumerate(analysis.factors) if f.input == name]
        g = result.get(ATTRIBUTION + name)
        if g is None:
            raise FailedPreconditionError(f"factors[{columns[0]}]: no gradient for input {name!r}")
        flat = np.asarray(g).reshape(rows, -1)[:, [analysis.factors[j].index for j in columns]]
        bad |= ~np.isfinite(flat).all(axis=1)
        out[:, columns] = flat
    return int(np.count_nonzero(bad))


async def evaluate(analysis: Analysis, sampler: Sampler, mv: ModelVersion, run: Runner, limits: Limits, *,
                   control: CallControl | None = None, progress: Progress | None = None,
                   chunk_rows: int | None = None, offload: Offload | None = None) -> Evaluations:
    """The model's outputs at every row of the sampler (and for DGSM its gradients with respect
    to the factors); ``progress(done, total)`` is awaited after every chunk. ``offload``
    runs the drawing of each chunk's rows off the event loop (None: inline)."""
    assert mv.engine is not None
    n = analysis.evaluations
    rows = chunk_rows or chunk_rows_for(analysis, mv.engine.buckets[-1])
    check = control.check if control is not None else None
    y = np.empty(n, np.float64)
    out = Evaluations(y, np.empty((n, analysis.dimension), np.float64) if analysis.method == "dgsm" else None)
    draw = offload or _inline
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        if check is not None:
            check()  # a cancelled or expired analysis stops between chunks

        def chunk(start: int = start, stop: int = stop) -> PreparedCall:
            x = sampler.rows(start, stop, check) if check is not None else sampler.rows(start, stop)
            return _prepare(analysis, mv, x, limits)

        call: PreparedCall = await draw(chunk)
        call.control = control
        call.check()
        result = await run(mv, call)
        y[start:stop] = output_values(analysis, result[OUTPUT + analysis.output])
        if out.gradients is not None:
            out.bad_gradients += _gradients(analysis, result, stop - start, out.gradients[start:stop])
        del result, call
        if progress is not None:
            await progress(stop, n)
    return out

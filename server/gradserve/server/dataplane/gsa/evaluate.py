"""Model evaluations of a sample matrix, in large chunks, through the model version's engine.

Each chunk is one prepared call of the engine's compiled functions (``predict`` for Sobol' and
Morris, ``gradient`` with the outputs of the same pass for DGSM), so the evaluations run on the
device the engine was configured with, in its biggest batches, and are queued with other
callers' work through the server's batcher. The deadline and the caller's cancellation are
checked before every chunk (and by the engine between the batches of a chunk).
"""
from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

from gradserve.server.compute import methods
from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import FailedPreconditionError
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, PreparedCall, TargetSpec
from gradserve.server.dataplane.gsa.problem import Analysis, elements
from gradserve.server.models.repository import ModelVersion

__all__ = ["evaluate", "chunk_rows_for", "output_values", "CHUNK_ELEMENTS", "MAX_CHUNK_ROWS"]

#: Input elements per chunk: large enough that the engine runs its biggest batches back to back,
#: small enough for frequent progress and cancellation points.
CHUNK_ELEMENTS = 1 << 20
#: Most rows per chunk.
MAX_CHUNK_ROWS = 1 << 15

Runner = Callable[[ModelVersion, PreparedCall], Awaitable[dict[str, np.ndarray]]]
Progress = Callable[[int, int], Awaitable[None]]


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


async def evaluate(analysis: Analysis, x: np.ndarray, mv: ModelVersion, run: Runner, limits: Limits, *,
                   control: CallControl | None = None, progress: Progress | None = None,
                   chunk_rows: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Outputs (N,) of the model at the rows of ``x`` (N, D), and for DGSM its gradients (N, D)
    with respect to the factors; ``progress(done, total)`` is awaited after every chunk."""
    assert mv.engine is not None
    n = len(x)
    rows = chunk_rows or chunk_rows_for(analysis, mv.engine.buckets[-1])
    y = np.empty(n, np.float64)
    grads = np.empty((n, analysis.dimension), np.float64) if analysis.method == "dgsm" else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        call = _prepare(analysis, mv, x[start:stop], limits)
        call.control = control
        call.check()  # a cancelled or expired analysis stops between chunks
        result = await run(mv, call)
        y[start:stop] = output_values(analysis, result[OUTPUT + analysis.output])
        if grads is not None:
            for j, f in enumerate(analysis.factors):
                g = result.get(ATTRIBUTION + f.input)
                if g is None:
                    raise FailedPreconditionError(f"factors[{j}]: no gradient for input {f.input!r}")
                grads[start:stop, j] = np.asarray(g).reshape(stop - start, -1)[:, f.index]
        if progress is not None:
            await progress(stop, n)
    return y, grads

"""One global sensitivity analysis from checked problem to indices: sample, evaluate, analyse.

Sampling and the analysis (NumPy and SALib) run on the default executor, the evaluations on the
compute threads through the runner (``evaluate``): the event loop only streams progress. The
call's control (deadline, cancellation) is checked between the chunks of the evaluations.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import numpy as np

from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.dataplane.gsa import analysis as _analysis
from gradserve.server.dataplane.gsa import sampling
from gradserve.server.dataplane.gsa.evaluate import Runner, evaluate
from gradserve.server.dataplane.gsa.problem import Analysis
from gradserve.server.models.repository import ModelVersion

__all__ = ["run_analysis"]


def _analyse(analysis: Analysis, x: np.ndarray, y: np.ndarray, grads: np.ndarray | None,
             seed: int) -> dict[str, np.ndarray]:
    _analysis.check_outputs(y, grads)
    if analysis.method == "sobol":
        return _analysis.sobol_indices(analysis, y, seed)
    if analysis.method == "morris":
        return _analysis.morris_measures(analysis, x, y, seed)
    assert grads is not None
    return _analysis.dgsm_measures(analysis, grads, y, seed)


async def run_analysis(analysis: Analysis, mv: ModelVersion, run: Runner, limits: Limits, *,
                       control: CallControl | None = None,
                       progress: Callable[[int, int], Awaitable[None]] | None = None,
                       chunk_rows: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sample, evaluate and analyse; returns the indices by SALib's key names and the outputs."""
    loop = asyncio.get_running_loop()
    seeds = sampling.seeds_for(analysis)
    x = await loop.run_in_executor(None, sampling.draw, analysis, seeds)
    y, grads = await evaluate(analysis, x, mv, run, limits, control=control, progress=progress,
                              chunk_rows=chunk_rows)
    indices = await loop.run_in_executor(None, _analyse, analysis, x, y, grads, seeds.bootstrap)
    return indices, y

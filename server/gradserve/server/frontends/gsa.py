"""The GlobalSensitivityService servicer: validate, sample, evaluate with progress, analyse, encode.

Sampling and the analysis (NumPy and SALib) run on the default executor, the evaluations on the
compute threads through ``ComputeRunner``: the event loop only validates, streams progress and
encodes. A call runs under the caller's deadline cut to ``max_deadline_s`` (like a stream: an
analysis may legitimately take long); a caller that cancels or goes away stops it at the next
chunk.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from gradserve.server.config import Limits
from gradserve.server.core.models import check_model_ref
from gradserve.server.core.spec import PreparedCall
from gradserve.server.dataplane.gsa import analysis as _analysis
from gradserve.server.dataplane.gsa import sampling
from gradserve.server.dataplane.gsa.evaluate import evaluate
from gradserve.server.dataplane.gsa.problem import Analysis, parse_request
from gradserve.server.models.repository import ModelRepository, ModelVersion
from gradserve.server.ops.status import status_for
from gradserve.v1 import global_sensitivity_service_pb2 as _pb2

__all__ = ["GlobalSensitivityServicer", "run_analysis", "encode_result"]

Runner = Callable[[ModelVersion, PreparedCall, "float | None"], Awaitable[dict[str, np.ndarray]]]


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
                       deadline: float | None = None, cancelled: threading.Event | None = None,
                       progress: Callable[[int, int], Awaitable[None]] | None = None,
                       chunk_rows: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sample, evaluate and analyse; returns the indices by SALib's key names and the outputs."""
    loop = asyncio.get_running_loop()
    seeds = sampling.seeds_for(analysis)
    x = await loop.run_in_executor(None, sampling.draw, analysis, seeds)
    y, grads = await evaluate(analysis, x, mv, run, limits, deadline=deadline, cancelled=cancelled,
                              progress=progress, chunk_rows=chunk_rows)
    indices = await loop.run_in_executor(None, _analyse, analysis, x, y, grads, seeds.bootstrap)
    return indices, y


def encode_result(req: _pb2.AnalyzeRequest, mv: ModelVersion, analysis: Analysis,
                  indices: dict[str, np.ndarray], y: np.ndarray) -> _pb2.AnalyzeResult:
    """Pack the indices into an AnalyzeResult."""
    result = _pb2.AnalyzeResult(model=mv.name, version=mv.version, request_id=req.request_id, names=analysis.names,
                                evaluations=analysis.evaluations, output_mean=float(np.mean(y)),
                                output_variance=float(np.var(y)))

    def values(key: str) -> list[float]:
        return [float(v) for v in np.ravel(indices[key])]

    if analysis.method == "sobol":
        result.sobol.s1.extend(values("S1"))
        result.sobol.s1_conf.extend(values("S1_conf"))
        result.sobol.st.extend(values("ST"))
        result.sobol.st_conf.extend(values("ST_conf"))
        if analysis.second_order:
            result.sobol.s2.extend(values("S2"))
            result.sobol.s2_conf.extend(values("S2_conf"))
    elif analysis.method == "dgsm":
        for key in ("vi", "vi_std", "dgsm", "dgsm_conf"):
            getattr(result.dgsm, key).extend(values(key))
    else:
        for key in ("mu", "mu_star", "sigma", "mu_star_conf"):
            getattr(result.morris, key).extend(values(key))
    return result


class GlobalSensitivityServicer:
    """Analyze (registered with ``add_GlobalSensitivityServiceServicer_to_server``).

    Parameters
    ----------
    repository
        The hosted models.
    run
        Runs one prepared call on a model version's engine, e.g. ``ComputeRunner.run``.
    limits
        ``max_gsa_evaluations``, ``max_gsa_dimension``, ``max_elements`` and ``max_deadline_s``.
    """

    def __init__(self, repository: ModelRepository, run: Runner, limits: Limits) -> None:
        self._repo = repository
        self._run = run
        self._limits = limits

    async def Analyze(self, request: _pb2.AnalyzeRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.AnalyzeResponse]:
        remaining = context.time_remaining()
        budget = self._limits.max_deadline_s if remaining is None else min(remaining, self._limits.max_deadline_s)
        deadline = time.monotonic() + budget
        cancelled = threading.Event()
        updates: asyncio.Queue[_pb2.AnalyzeResponse | None] = asyncio.Queue()

        async def progress(done: int, total: int) -> None:
            updates.put_nowait(_pb2.AnalyzeResponse(progress=_pb2.Progress(evaluations_done=done,
                                                                           evaluations_total=total)))

        async def work() -> _pb2.AnalyzeResponse:
            try:
                check_model_ref(request.model, request.version)
                mv = self._repo.get(request.model, request.version)
                with mv.acquire():  # an unloading version waits for this analysis
                    analysis = parse_request(request, mv.model, self._limits)
                    await progress(0, analysis.evaluations)
                    indices, y = await run_analysis(analysis, mv, self._run, self._limits, deadline=deadline,
                                                    cancelled=cancelled, progress=progress)
                    return _pb2.AnalyzeResponse(result=encode_result(request, mv, analysis, indices, y))
            finally:
                updates.put_nowait(None)

        # The work runs as its own task so that this generator can yield its progress meanwhile.
        task = asyncio.ensure_future(work())
        code: Any = None
        try:
            while (update := await updates.get()) is not None:
                yield update
            yield await task
        except asyncio.CancelledError:
            cancelled.set()  # the caller went away: the engine stops at its next batch
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            code, message = status_for(exc, request.request_id)
        finally:
            if not task.done():
                cancelled.set()
                task.cancel()
        if code is not None:
            await context.abort(code, message)

"""One global sensitivity analysis from checked problem to indices: sample, evaluate, analyse.

The evaluations run on the compute threads through the runner (``evaluate``); everything else
(drawing the samples, the analysis: NumPy and SALib's estimators) runs on the analysis threads
(``offload``), in slices that check the call's control (deadline, cancellation) between them, so
an analysis whose caller went away or ran out of time stops within a slice, whatever its phase.
The analysis threads run at a lower CPU priority than the rest of the server (``nice``
``ANALYSIS_NICENESS``, Linux applies it to the thread), so that concurrent calls keep their
latency while an analysis computes; the event loop only streams progress (and, while a phase
without evaluations runs, the last progress again every ``HEARTBEAT_S`` seconds, so that the
stream carries data and keepalive pings stay welcome).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np

from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.dataplane.gsa import analysis as _analysis
from gradserve.server.dataplane.gsa import sampling
from gradserve.server.dataplane.gsa.evaluate import Evaluations, Runner, evaluate
from gradserve.server.dataplane.gsa.problem import Analysis
from gradserve.server.models.repository import ModelVersion

__all__ = ["run_analysis", "offload", "ANALYSIS_THREADS", "ANALYSIS_NICENESS", "HEARTBEAT_S"]

#: Threads that sample and analyse (more analyses at once queue for them).
ANALYSIS_THREADS = 4
#: Niceness added to each analysis thread (0: none).
ANALYSIS_NICENESS = 10
#: While a phase without progress runs, the last progress is sent again this often, in seconds.
HEARTBEAT_S = 10.0

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

Progress = Callable[[int, int], Awaitable[None]]


def _lower_priority() -> None:
    try:  # Linux: the niceness of this thread only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                       + ANALYSIS_NICENESS))
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not allowed: normal priority
        pass


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(ANALYSIS_THREADS, thread_name_prefix="gradserve-gsa",
                                       initializer=_lower_priority)
        return _pool


async def offload(fn: Callable[[], Any]) -> Any:
    """``fn()`` on an analysis thread."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn)


async def _phase(fn: Callable[[], Any], progress: Progress | None, done: int, total: int) -> Any:
    """``fn()`` on an analysis thread, repeating ``progress(done, total)`` every HEARTBEAT_S meanwhile."""
    future = asyncio.ensure_future(offload(fn))
    try:
        while True:
            finished, _ = await asyncio.wait({future}, timeout=HEARTBEAT_S)
            if finished:
                return future.result()
            if progress is not None:
                await progress(done, total)
    finally:
        future.cancel()  # the caller went away: the thread stops at its next check


def _trim() -> None:
    """Give the heap's free memory back to the system (glibc keeps what arrays below its mmap
    threshold, 32 MiB at most, leave behind; an analysis frees hundreds of them)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _analyse(analysis: Analysis, sampler: sampling.Sampler, ev: Evaluations, seed: int,
             check: Callable[[], None]) -> dict[str, np.ndarray]:
    try:
        _analysis.check_outputs(ev.y, ev.bad_gradients)
        if analysis.method == "sobol":
            return _analysis.sobol_indices(analysis, ev.y, seed, check)
        if analysis.method == "morris":
            assert isinstance(sampler, sampling.MorrisSampler)
            return _analysis.morris_measures(analysis, sampler.x, ev.y, seed, check)
        assert ev.gradients is not None
        return _analysis.dgsm_measures(analysis, ev.gradients, ev.y, seed, check)
    finally:
        _trim()


def _never() -> None:
    return None


async def run_analysis(analysis: Analysis, mv: ModelVersion, run: Runner, limits: Limits, *,
                       control: CallControl | None = None, progress: Progress | None = None,
                       chunk_rows: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sample, evaluate and analyse; returns the indices by SALib's key names and the outputs."""
    check = control.check if control is not None else _never
    total = analysis.evaluations
    seeds = sampling.seeds_for(analysis)
    sampler = await _phase(functools.partial(sampling.sampler_for, analysis, seeds, check), progress, 0, total)
    ev = await evaluate(analysis, sampler, mv, run, limits, control=control, progress=progress,
                        chunk_rows=chunk_rows, offload=offload)
    indices = await _phase(functools.partial(_analyse, analysis, sampler, ev, seeds.bootstrap, check),
                           progress, total, total)
    return indices, ev.y

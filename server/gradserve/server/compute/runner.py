"""Runs prepared engine calls: one ``DynamicBatcher`` per model version, a pool of compute threads.

``ComputeRunner`` is the data plane's way to the engine (``dataplane.DataPlane`` owns one); see
``service``'s docstring for the concurrency model it implements.

The inline path: a hop to a compute thread and back costs the event loop more than a cheap
engine call itself (a LiteRT batch-1 gradient is a few microseconds). So the runner times the
engine calls (per function key, batch size and engine: the least time seen, rising slowly while
every call takes longer, ``_estimate``) and runs a request on the loop itself when its kind of
call measured at most ``BatchingConfig.inline_max_us``, whether or not the model's batcher has
calls queued or running. Calls on the compute threads are timed by the clock (TensorFlow's
kernels run on its own pools), one inline call in ``INLINE_TIMING_EVERY`` by the loop thread's
CPU time (what it costs the loop, whatever the machine's load). A call that has never been timed
goes to a thread first; cheap calls then never leave the loop, however many callers there are,
so the batcher only merges the calls that are not cheap. (Requiring an idle batcher, as before,
let 64 closed-loop clients keep it busy for good once one call had gone to a thread: every
request then hopped to a thread and back.)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Callable, Hashable, Mapping

import numpy as np

from gradserve.server.compute.batcher import BatcherStats, DynamicBatcher
from gradserve.server.config import BatchingConfig
from gradserve.server.core.models import ModelState
from gradserve.server.core.spec import PreparedCall
from gradserve.server.models.repository import Engine, ModelVersion
from gradserve.server.ops import tracing

__all__ = ["ComputeRunner", "ESTIMATE_RISE", "INLINE_TIMING_EVERY"]

#: Most the estimate of a kind of call's time rises per timed call (``_estimate``).
ESTIMATE_RISE = 1.05
#: One inline call in this many is timed.
INLINE_TIMING_EVERY = 8


class ComputeRunner:
    """Runs prepared calls on the engine, off the event loop, through one ``DynamicBatcher`` per
    model version (or straight on the compute threads where batching is off).

    Parameters
    ----------
    threads
        Compute threads (TensorFlow calls), shared by the models.
    batching
        Batching defaults.
    model_batching
        Per-model overrides of ``batching``, by model name.
    """

    def __init__(self, threads: int, batching: BatchingConfig | None = None,
                 model_batching: Mapping[str, BatchingConfig] | None = None) -> None:
        self.threads = max(1, threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="gradserve-compute")
        self.batching = batching or BatchingConfig()
        self._per_model = dict(model_batching or {})
        # (name, version) -> (engine, batcher); a reloaded version gets a new engine and batcher.
        # Read on the event loop, pruned by ``forget`` from the repository's threads.
        self._batchers: dict[tuple[str, int], tuple[Engine, DynamicBatcher]] = {}
        self._lock = threading.Lock()
        #: Told of every merged engine call: (model name, rows, queue wait in seconds).
        self.observer: Callable[[str, int, float], None] | None = None
        #: Set by ``close``.
        self.closed = False
        # (engine id, function key, rows) -> estimated seconds of its engine calls (``_estimate``).
        self._cost: dict[tuple[int, Hashable, int], float] = {}
        self._inline_calls = 0

    def config_for(self, model: str) -> BatchingConfig:
        """The batching configuration of ``model`` (its override, else the default)."""
        return self._per_model.get(model, self.batching)

    def batcher(self, mv: ModelVersion) -> DynamicBatcher:
        """The batcher of one model version (created on first use)."""
        key = (mv.name, mv.version)
        entry = self._batchers.get(key)
        if entry is None or entry[0] is not mv.engine:
            assert mv.engine is not None
            cfg = self.config_for(mv.name)
            entry = (mv.engine, DynamicBatcher(self._timed(mv.engine), self._pool, cfg,
                                               min(cfg.max_inflight, self.threads)))
            if self.observer is not None:
                observer, name = self.observer, mv.name
                entry[1].observer = lambda rows, wait: observer(name, rows, wait)
            entry[1].trace = tracing.ModelTrace(mv)
            if mv.state is ModelState.READY:  # an unloading version's last requests are not remembered
                with self._lock:
                    self._batchers[key] = entry
        return entry[1]

    def _timed(self, engine: Engine) -> Callable[[PreparedCall], Any]:
        """``engine.run`` that keeps the average time of each kind of call (compute threads)."""
        cost, ident = self._cost, id(engine)

        def run(call: PreparedCall) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            result = engine.run(call)
            key = (ident, call.key, call.batch_size)
            seconds = time.perf_counter() - start
            before = cost.get(key)
            cost[key] = seconds if before is None else _estimate(before, seconds)
            return result

        return run

    def forget(self, mv: ModelVersion) -> None:
        """Drop the batcher of a version that is unloading or failed, so that its engine can be
        freed once its last requests (which keep their batcher) are done. A repository listener."""
        if mv.state not in (ModelState.UNLOADING, ModelState.FAILED):
            return
        with self._lock:
            entry = self._batchers.get((mv.name, mv.version))
            if entry is not None and entry[0] is mv.engine:
                del self._batchers[(mv.name, mv.version)]

    def batcher_stats(self) -> dict[tuple[str, int], BatcherStats]:
        """Counters of every live batcher, by (model, version)."""
        with self._lock:
            return {key: batcher.stats for key, (_, batcher) in self._batchers.items()}

    def run_inline(self, mv: ModelVersion, call: PreparedCall) -> dict[str, np.ndarray] | None:
        """``call``'s result computed at once on this thread (the event loop) when its kind of
        engine call measured cheap enough (``inline_max_us``), whether or not calls of the model
        are queued or running on the threads; None otherwise (``run`` it)."""
        cfg = self._per_model.get(mv.name, self.batching)
        if not cfg.enabled or cfg.inline_max_us <= 0:
            return None
        engine = mv.engine
        assert engine is not None
        key = (id(engine), call.key, call.batch_size)
        seconds = self._cost.get(key)
        if seconds is None or seconds * 1e6 > cfg.inline_max_us:
            return None
        # Cheaper than the hop to a thread and back. One call in ``INLINE_TIMING_EVERY`` is timed
        # (by this thread's CPU time: waits for the CPU or the GIL are not the call's; the clock
        # is a system call), so that a kind of call that became slower goes back to the threads.
        self._inline_calls += 1
        if self._inline_calls % INLINE_TIMING_EVERY:
            if not tracing.ACTIVE:
                return engine.run(call)
            with tracing.engine_span(mv, call):
                return engine.run(call)
        start = time.thread_time()
        with tracing.engine_span(mv, call):
            result = engine.run(call)
        self._cost[key] = _estimate(seconds, time.thread_time() - start)
        return result

    async def run(self, mv: ModelVersion, call: PreparedCall) -> dict[str, np.ndarray]:
        """Compute ``call`` on ``mv``'s engine; a request still queued at its deadline
        (``call.deadline``) is answered DEADLINE_EXCEEDED without being computed."""
        assert mv.engine is not None
        result = self.run_inline(mv, call)
        if result is not None:
            return result
        if self.config_for(mv.name).enabled:
            return await self.batcher(mv).submit(call)
        call.check()
        with tracing.engine_span(mv, call):
            return await asyncio.get_running_loop().run_in_executor(self._pool, mv.engine.run, call)

    def close(self) -> None:
        """Fail what is queued and stop the compute threads (server shutdown)."""
        self.closed = True
        with self._lock:
            batchers = [batcher for _, batcher in self._batchers.values()]
        for batcher in batchers:
            batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _estimate(before: float, seconds: float) -> float:
    """The next estimate of a kind of call's time: the least time seen, rising by at most
    ``ESTIMATE_RISE`` per call while every call takes longer.

    On a shared machine a few-µs call takes tens of µs of wall-clock time for stretches (another
    process on the core, or the thread preempted): an average of such samples (it was an
    exponential one) crossed ``inline_max_us`` and sent calls of a 15 µs kind to the compute
    threads, 1-7% of them under load, each hop costing the event loop more than the call. A
    kind of call that really became slower crosses the limit within a few dozen calls."""
    return min(seconds, before * ESTIMATE_RISE)

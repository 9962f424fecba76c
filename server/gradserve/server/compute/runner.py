"""Runs prepared engine calls: one ``DynamicBatcher`` per model version, a pool of compute threads.

``ComputeRunner`` is the data plane's way to the engine (``dataplane.DataPlane`` owns one); see
``service``'s docstring for the concurrency model it implements.

The inline path: a hop to a compute thread and back costs the event loop more than a cheap
engine call itself (a LiteRT batch-1 gradient is a few microseconds). So the runner times the
engine calls made on the compute threads (an exponential average per function key and batch
size and engine) and runs a request on the loop itself when its model's batcher is idle and its
kind of call measured at most ``BatchingConfig.inline_max_us``. Under load the batcher is busy
and requests merge as before; a call that has never been timed always goes to a thread first.
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

__all__ = ["ComputeRunner"]


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
        # (engine id, function key, rows) -> average seconds of its engine calls on the threads.
        self._cost: dict[tuple[int, Hashable, int], float] = {}

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
            cost[key] = seconds if before is None else 0.8 * before + 0.2 * seconds
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

    async def run(self, mv: ModelVersion, call: PreparedCall) -> dict[str, np.ndarray]:
        """Compute ``call`` on ``mv``'s engine; a request still queued at its deadline
        (``call.deadline``) is answered DEADLINE_EXCEEDED without being computed."""
        assert mv.engine is not None
        cfg = self.config_for(mv.name)
        if cfg.enabled:
            batcher = self.batcher(mv)
            if cfg.inline_max_us > 0 and batcher.idle:
                key = (id(mv.engine), call.key, call.batch_size)
                seconds = self._cost.get(key)
                if seconds is not None and seconds * 1e6 <= cfg.inline_max_us:
                    # Cheaper than the hop to a thread and back; timed too, so that a kind of
                    # call that became slower goes back to the threads.
                    start = time.perf_counter()
                    with tracing.engine_span(mv, call):
                        result = mv.engine.run(call)
                    self._cost[key] = 0.8 * seconds + 0.2 * (time.perf_counter() - start)
                    return result
            return await batcher.submit(call)
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

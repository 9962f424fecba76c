"""Dynamic batching: merges concurrent compatible requests into one compiled engine call.

One ``DynamicBatcher`` serves one model version. It lives on the server's event loop and is
event driven (no polling task): a request is queued by ``submit``; the queue is pumped when a
request arrives, when a merged call finishes and when a hold timer fires. A pump takes the
oldest live request and every later compatible one (same ``PreparedCall.key``, same batched
array structure, equal ``shared`` arrays) up to ``max_batch_size`` rows, concatenates their
``batched`` arrays, runs the engine once on the compute threads and splits the result back by
rows.

Dispatch policy ("no delay when idle"): a request that finds the model idle (no call running,
nothing queued) is dispatched at once, so a lone caller never waits. A request that arrives
while the model is busy waits for a free call slot (``max_inflight`` merged calls of one model
at a time, default one) and is held at most ``max_delay_us`` after its arrival for companions,
unless its batch is full; then it goes with every compatible request queued by then. Measured
on CPU (bench/run.py, 64 batch-1 clients): one call at a time merges 4-10 requests per call
against 3-4 with two, for 20-90% more requests per second and less CPU per request; the hold
adds merges under load (5 -> 7 per call for ``dense2``) at no cost to 8 clients' latency, and
keeps a loop that is slower than the engine from feeding it one request per call.

The queue is bounded (``max_queue`` requests; more get ``ResourceExhaustedError``), requests
whose deadline passed while queued are answered ``DeadlineExceededError`` without being
computed, and requests whose caller went away (their future was cancelled) are skipped.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np

from gradserve.server.config import BatchingConfig
from gradserve.server.core.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from gradserve.server.core.spec import PreparedCall
from gradserve.server.ops import tracing

__all__ = ["DynamicBatcher", "BatcherStats", "Result", "call_signature", "merge_calls", "split_result"]

Result = dict[str, np.ndarray]
#: The engine entry point: runs one PreparedCall.
EngineFn = Callable[[PreparedCall], Result]


def call_signature(call: PreparedCall) -> tuple[Hashable, ...]:
    """What must be equal for two calls to be merged (besides the values of ``shared``)."""
    return (
        call.key,
        tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(call.batched.items())),
        tuple((k, v.dtype.str, v.shape) for k, v in sorted(call.shared.items())),
    )


def _shared_equal(a: PreparedCall, b: PreparedCall) -> bool:
    if a.shared is b.shared:
        return True
    return all(np.array_equal(v, b.shared[k]) for k, v in a.shared.items())


def merge_calls(calls: list[PreparedCall]) -> PreparedCall:
    """One call whose batched arrays are the calls' concatenated by rows."""
    first = calls[0]
    if len(calls) == 1:
        return first
    batched = {k: np.concatenate([c.batched[k] for c in calls], axis=0) for k in first.batched}
    # One caller's deadline or cancellation must not stop the others' work: the batcher drops
    # expired and cancelled requests before a merged call starts, so the merged call has neither.
    return dataclasses.replace(first, batched=batched, control=None)


def split_result(result: Result, sizes: list[int]) -> list[Result]:
    """Split a merged result back into per-call results, by rows."""
    if len(sizes) == 1:
        return [result]
    out: list[Result] = []
    start = 0
    for n in sizes:
        out.append({k: v[start:start + n] for k, v in result.items()})
        start += n
    return out


@dataclass
class BatcherStats:
    """Counters of one batcher (read by tests, metrics and the benchmark)."""

    #: Requests accepted into the queue.
    submitted: int = 0
    #: Engine calls made (one per merged batch).
    engine_calls: int = 0
    #: Requests computed (summed over engine calls).
    requests_run: int = 0
    #: Rows computed (summed over engine calls).
    rows_run: int = 0
    #: Requests refused because the queue was full.
    rejected: int = 0
    #: Requests dropped because their deadline passed while queued.
    expired: int = 0
    #: Requests dropped because their caller went away while queued.
    cancelled: int = 0
    #: Largest number of requests merged into one engine call.
    max_merged: int = 0


@dataclass
class _Item:
    call: PreparedCall
    signature: tuple[Hashable, ...]
    rows: int
    future: asyncio.Future[Result]
    enqueued: float
    deadline: float | None = None
    #: Queued while the model was busy (a call running or requests waiting): such a request
    #: may be held for companions; one that finds the model idle never is.
    busy: bool = False
    #: When its merged call started (``time.time_ns()``) and that call's rows; tracing only.
    dispatched_ns: int = 0
    batch_rows: int = 0


class DynamicBatcher:
    """Queue and merge calls of one model version (see the module docstring).

    Parameters
    ----------
    engine
        Runs one PreparedCall on the engine, e.g. ``CompiledModel.run``; called on ``executor``.
    executor
        The compute threads.
    config
        Batch size, hold delay and queue bound.
    max_inflight
        Most merged calls of this model running at once.
    """

    def __init__(self, engine: EngineFn, executor: concurrent.futures.Executor, config: BatchingConfig,
                 max_inflight: int = 1) -> None:
        self._engine = engine
        self._executor = executor
        self.config = config
        self._max_inflight = max(1, max_inflight)
        self._delay = max(0.0, config.max_delay_us / 1e6)
        self._pending: collections.deque[_Item] = collections.deque()
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = BatcherStats()
        #: Called on the event loop for every engine call: (rows, seconds the oldest request
        #: waited); metrics use it for the batch-size and queue-time histograms.
        self.observer: Callable[[int, float], None] | None = None
        #: Makes the queue and engine spans of each request while tracing is on (``tracing``).
        self.trace: tracing.ModelTrace | None = None

    # -- public -----------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests waiting (not yet handed to the engine)."""
        return len(self._pending)

    @property
    def inflight(self) -> int:
        """Merged calls running on the compute threads."""
        return self._inflight

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._pending and not self._inflight

    async def submit(self, call: PreparedCall) -> Result:
        """Queue ``call`` and wait for its result; a request whose deadline (``call.deadline``)
        passes while it waits is not computed.

        Raises
        ------
        ResourceExhaustedError
            The queue holds ``max_queue`` requests already.
        DeadlineExceededError
            The deadline passed before the request reached the engine.
        """
        if len(self._pending) >= self.config.max_queue:
            self.stats.rejected += 1
            raise ResourceExhaustedError(f"queue: model queue is full ({self.config.max_queue} requests "
                                         "waiting); retry later")
        queued_ns = time.time_ns() if tracing.ACTIVE else 0
        loop = self._loop = asyncio.get_running_loop()
        item = _Item(call, call_signature(call), call.batch_size, loop.create_future(), time.monotonic(),
                     call.deadline, busy=bool(self._inflight or self._pending))
        self._pending.append(item)
        self.stats.submitted += 1
        self._pump()
        if not queued_ns or self.trace is None:
            return await item.future
        return await self._traced(item, self.trace, queued_ns)

    async def _traced(self, item: _Item, trace: tracing.ModelTrace, queued_ns: int) -> Result:
        try:
            result = await item.future
        except BaseException as exc:  # cancelled too: the caller's deadline passed while it waited
            trace.record(item.call, queued_ns, item, exc)
            raise
        trace.record(item.call, queued_ns, item, None)
        return result

    def close(self) -> None:
        """Fail every queued request (server shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(_shutting_down())

    # -- dispatch ---------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start merged calls while there are requests and free compute slots."""
        while self._pending and self._inflight < self._max_inflight:
            now = time.monotonic()
            self._drop_dead(now)
            if not self._pending:
                return
            head = self._pending[0]
            if head.busy and self._delay and head.enqueued + self._delay > now:
                # The model is under load: hold a partial batch until max_delay after its oldest
                # request arrived, so that the requests arriving meanwhile join it, unless it is
                # full already. (Without the hold, a loop slower than the engine feeds it one
                # request per call, and the many small calls slow the loop further.)
                if self._queued_rows(head) < self.config.max_batch_size:
                    self._arm_timer(head.enqueued + self._delay - now)
                    return
            batch = self._take(head)
            self._start(batch)

    def _drop_dead(self, now: float) -> None:
        # Only the head is inspected eagerly; dead items deeper in the queue are dropped when
        # they reach it or when a batch is gathered past them.
        while self._pending:
            head = self._pending[0]
            if head.future.done():
                self._pending.popleft()
                self.stats.cancelled += 1
            elif head.deadline is not None and head.deadline <= now:
                self._pending.popleft()
                self.stats.expired += 1
                head.future.set_exception(DeadlineExceededError(
                    "deadline: the request's deadline passed while it was queued"))
            else:
                return

    def _queued_rows(self, head: _Item) -> int:
        rows = 0
        for item in self._pending:
            if item.signature == head.signature:
                rows += item.rows
                if rows >= self.config.max_batch_size:
                    break
        return rows

    def _take(self, head: _Item) -> list[_Item]:
        """Remove the head and the compatible requests that fit after it, keeping queue order."""
        self._pending.popleft()
        batch = [head]
        rows = head.rows
        limit = self.config.max_batch_size
        if rows >= limit or not self._pending:
            return batch
        now = time.monotonic()
        kept: collections.deque[_Item] = collections.deque()
        while self._pending:
            item = self._pending.popleft()
            if item.future.done():
                self.stats.cancelled += 1
                continue
            if item.deadline is not None and item.deadline <= now:
                self.stats.expired += 1
                item.future.set_exception(DeadlineExceededError(
                    "deadline: the request's deadline passed while it was queued"))
                continue
            if (rows + item.rows <= limit and item.signature == head.signature
                    and _shared_equal(head.call, item.call)):
                batch.append(item)
                rows += item.rows
                if rows >= limit:
                    break
            else:
                kept.append(item)
        kept.extend(self._pending)
        self._pending = kept
        return batch

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _start(self, batch: list[_Item]) -> None:
        assert self._loop is not None
        self._inflight += 1
        st = self.stats
        st.engine_calls += 1
        st.requests_run += len(batch)
        st.rows_run += sum(i.rows for i in batch)
        st.max_merged = max(st.max_merged, len(batch))
        if tracing.ACTIVE:
            tracing.stamp_dispatch(batch, sum(i.rows for i in batch))
        if self.observer is not None:
            self.observer(sum(i.rows for i in batch), time.monotonic() - batch[0].enqueued)
        calls = [i.call for i in batch]
        loop = self._loop

        def job() -> None:
            # On a compute thread. The results come back with one call_soon_threadsafe instead
            # of run_in_executor's future chain: one event-loop turn less per engine call.
            try:
                results = self._execute(calls)
            except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch
                results = [exc] * len(batch)
            try:
                loop.call_soon_threadsafe(self._finished, batch, results)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        def dropped(f: concurrent.futures.Future[None]) -> None:
            if f.cancelled():  # the compute threads were shut down before the job started
                try:
                    failed: list[Result | BaseException] = [_shutting_down()] * len(batch)
                    loop.call_soon_threadsafe(self._finished, batch, failed)
                except RuntimeError:
                    pass

        try:
            self._executor.submit(job).add_done_callback(dropped)
        except RuntimeError:  # the compute threads were shut down
            self._finished(batch, [_shutting_down()] * len(batch))

    def _execute(self, calls: list[PreparedCall]) -> list[Result | BaseException]:
        """On a compute thread: one engine call for the batch, split back by request."""
        if len(calls) == 1:
            try:
                return [self._engine(calls[0])]
            except Exception as exc:  # noqa: BLE001 - handed to the request's future
                return [exc]
        try:
            return list(split_result(self._engine(merge_calls(calls)), [c.batch_size for c in calls]))
        except Exception:  # noqa: BLE001
            # A merged call failed: run each request alone so that one bad request cannot fail
            # the others it happened to be merged with.
            return self._execute_each(calls)

    def _execute_each(self, calls: list[PreparedCall]) -> list[Result | BaseException]:
        out: list[Result | BaseException] = []
        for call in calls:
            try:
                out.append(self._engine(call))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def _finished(self, batch: list[_Item], results: list[Result | BaseException]) -> None:
        self._inflight -= 1
        for item, res in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)
        self._pump()


def _shutting_down() -> UnavailableError:
    return UnavailableError("server: shutting down")

"""Admission of computing calls and ComputeStreams: our own limits, so that health never starves.

gRPC's ``maximum_concurrent_rpcs`` counts every RPC alike, so 1024 idle streams (or slow
calls) refused health checks too, and a liveness probe would have restarted a healthy server.
``Admission`` counts only the calls that compute and refuses past its limits with
RESOURCE_EXHAUSTED; health, reflection, model metadata and ModelService are never counted:

- ``max_concurrent_calls``: computing calls in flight, every protocol together (native Compute,
  the Open Inference Protocol's inferences over gRPC and REST, Analyze); the call envelope
  (``calls``) admits each (``enter``);
- ``max_concurrent_analyses``: global sensitivity analyses in flight (each also counts as a call);
- ``max_streams`` and ``max_streams_per_connection``: ComputeStreams open, in all and on one
  connection (one HTTP/2 connection, i.e. one peer address and port);
- ``stream_idle_s``: a stream with no request in flight for that long is ended with
  UNAVAILABLE (the SDK reopens a stream ended so when it has more to send);
- ``max_deadline_s``: no stream lives longer, whatever the caller's deadline; it is ended with
  DEADLINE_EXCEEDED (its requests in flight are cancelled).

Everything runs on the server's event loop (one thread), so the counts need no lock. A limit
of 0 is no limit. ``guard_stream`` wraps the ComputeStream handler: no interceptor, which would
cost every RPC a chain of coroutines.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable

import grpc

from gradserve.server.config import Limits
from gradserve.server.core.errors import ResourceExhaustedError

__all__ = ["Admission"]

_log = logging.getLogger("gradserve.server")

_Stream = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncGenerator[Any, None]]
_RE = grpc.StatusCode.RESOURCE_EXHAUSTED


class _StreamClock:
    """When one stream is due to end: its lifetime, and its idle time while nothing is in flight."""

    def __init__(self, limits: Limits) -> None:
        now = time.monotonic()
        self.lifetime = limits.max_deadline_s
        self.idle = limits.stream_idle_s
        self.end = now + self.lifetime if self.lifetime > 0 else None
        self.idle_since = now
        #: Requests read and not yet answered.
        self.inflight = 0
        #: The timeout of the wait for the next answer, while waiting (``ComputeStream``).
        self.timer: asyncio.Timeout | None = None

    def due(self) -> float | None:
        """``time.monotonic()`` at which the stream ends unless something happens first."""
        if self.inflight or self.idle <= 0:
            return self.end
        idle_end = self.idle_since + self.idle
        return idle_end if self.end is None else min(self.end, idle_end)

    async def count(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``requests``, counting each as in flight (a request arriving stops the idle clock)."""
        async for message in requests:
            self.inflight += 1
            if self.timer is not None:
                self.timer.reschedule(self.end)
            yield message

    def answered(self) -> None:
        self.inflight = max(0, self.inflight - 1)
        if not self.inflight:
            self.idle_since = time.monotonic()

    def expired(self, when: float | None) -> tuple[grpc.StatusCode, str]:
        """Status and message of a stream whose timer set for ``when`` fired."""
        if when is not None and when == self.end:
            return (grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stream open for {self.lifetime:g} s, the longest a stream may live (--max-deadline); "
                    "open a new stream")
        return (grpc.StatusCode.UNAVAILABLE,
                f"stream idle for {self.idle:g} s with no request in flight (--stream-idle-seconds); "
                "open a new stream when there is more to send")


class Admission:
    """Counts and limits of Compute calls and ComputeStreams (see the module docstring).

    Parameters
    ----------
    limits
        ``max_concurrent_calls``, ``max_concurrent_analyses``, ``max_streams``, ``max_streams_per_connection``,
        ``stream_idle_s`` and ``max_deadline_s``.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: Computing calls in flight (every protocol), and the analyses among them.
        self.calls = 0
        self.analyses = 0
        #: ComputeStreams open, in all and by peer (connection).
        self.streams = 0
        self.streams_by_peer: dict[str, int] = {}
        valve = limits.max_concurrent_rpcs
        if 0 < valve <= limits.max_concurrent_calls + limits.max_streams:
            _log.warning("--max-concurrent-rpcs %d is not above --max-concurrent-calls + --max-streams (%d): "
                         "compute RPCs can fill it and health checks will be refused", valve,
                         limits.max_concurrent_calls + limits.max_streams)

    def enter(self, kind: str) -> None:
        """Count one call of ``kind`` ("call" or "analysis") in; ResourceExhaustedError past a limit."""
        limits = self.limits
        if 0 < limits.max_concurrent_calls <= self.calls:
            raise ResourceExhaustedError(f"{self.calls} calls in flight, the limit (--max-concurrent-calls); "
                                         "retry later")
        if kind == "analysis":
            if 0 < limits.max_concurrent_analyses <= self.analyses:
                raise ResourceExhaustedError(f"{self.analyses} analyses in flight, the limit "
                                             "(--max-concurrent-analyses); retry later")
            self.analyses += 1
        self.calls += 1

    def leave(self, kind: str) -> None:
        """Count a call admitted by ``enter`` out."""
        self.calls -= 1
        if kind == "analysis":
            self.analyses -= 1

    def _refusal(self, peer: str) -> str | None:
        limits = self.limits
        if 0 < limits.max_streams <= self.streams:
            return f"{self.streams} ComputeStreams open, the limit (--max-streams); retry later"
        on_peer = self.streams_by_peer.get(peer, 0)
        if 0 < limits.max_streams_per_connection <= on_peer:
            return (f"{on_peer} ComputeStreams open on this connection, the limit (--max-streams-per-connection); "
                    "retry later or use another connection")
        return None

    def _release(self, peer: str) -> None:
        self.streams -= 1
        left = self.streams_by_peer[peer] - 1
        if left:
            self.streams_by_peer[peer] = left
        else:
            del self.streams_by_peer[peer]

    def guard_stream(self, behavior: _Stream) -> _Stream:
        """``behavior`` (a stream handler) behind the stream limits, idle time and lifetime."""

        async def ComputeStream(requests: AsyncIterator[Any],
                                context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            peer = context.peer()
            refusal = self._refusal(peer)
            if refusal is not None:
                await context.abort(_RE, refusal)
            self.streams += 1
            self.streams_by_peer[peer] = self.streams_by_peer.get(peer, 0) + 1
            clock = _StreamClock(self.limits)
            task = asyncio.current_task()
            # The wait below ends a stream on time; this ends one whose handler is elsewhere at
            # the end of its lifetime (writing an answer its caller does not read).
            watchdog = (asyncio.get_running_loop().call_at(clock.end, _cancel_unless_waiting, clock, task)
                        if clock.end is not None and task is not None else None)
            try:
                answers = behavior(clock.count(requests), context)
                try:
                    while True:
                        # Only the wait for the next answer is timed: a timeout must never fire
                        # inside gRPC's own code between our yields.
                        try:
                            async with asyncio.timeout_at(clock.due()) as clock.timer:
                                answer = await anext(answers)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            code, message = clock.expired(clock.timer.when() if clock.timer else None)
                            break
                        finally:
                            clock.timer = None
                        yield answer
                        clock.answered()
                finally:
                    await answers.aclose()
                await context.abort(code, message)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                self._release(peer)

        return ComputeStream


def _cancel_unless_waiting(clock: _StreamClock, task: asyncio.Task[Any]) -> None:
    if clock.timer is None:  # while waiting, the wait's own timeout ends the stream
        task.cancel()

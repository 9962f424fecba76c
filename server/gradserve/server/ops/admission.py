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
    """When one stream is due to end: its lifetime, and its idle time while nothing is in flight.

    One alarm (a loop timer) per stream rather than a timeout per answer: a request arriving or
    an answer written only moves counters and a timestamp, and the alarm, when it rings early
    (the stream did something meanwhile), sets itself again for the new due time. It ends the
    stream (cancels the handler's task) only while the handler waits for its next answer, the
    one place where gRPC's own code is not running on the task; past the stream's lifetime it
    ends it wherever the handler is (writing an answer its caller does not read, say).
    """

    def __init__(self, limits: Limits, task: asyncio.Task[Any]) -> None:
        now = time.monotonic()
        self.lifetime = limits.max_deadline_s
        self.idle = limits.stream_idle_s
        self.end = now + self.lifetime if self.lifetime > 0 else None
        self.idle_since = now
        #: Requests read and not yet answered.
        self.inflight = 0
        #: Whether the handler waits for its next answer (the alarm may end the stream there).
        self.waiting = False
        #: The status the alarm ended the stream with (None while it has not).
        self.fired: tuple[grpc.StatusCode, str] | None = None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._alarm: asyncio.TimerHandle | None = None
        if self.end is not None:
            self._alarm = self._loop.call_at(self.end, self._ring)

    def due(self) -> float | None:
        """``time.monotonic()`` at which the stream ends unless something happens first."""
        if self.inflight or self.idle <= 0:
            return self.end
        idle_end = self.idle_since + self.idle
        return idle_end if self.end is None else min(self.end, idle_end)

    def wait(self) -> tuple[grpc.StatusCode, str] | None:
        """Before waiting for the next answer: the status that ends the stream now if it is already
        due; else None, with the alarm set no later than it is due."""
        due = self.due()
        if due is None:
            return None
        if due <= time.monotonic():
            return self.expired(due)
        alarm = self._alarm
        if alarm is None or alarm.when() > due:
            if alarm is not None:
                alarm.cancel()
            self._alarm = self._loop.call_at(due, self._ring)
        self.waiting = True
        return None

    def _ring(self) -> None:
        self._alarm = None
        now = time.monotonic()
        end = self.end
        if end is not None and now >= end:
            if self.waiting:
                self.fired = self.expired(end)
            self._task.cancel()
            return
        due = self.due()
        if self.waiting and due is not None and due <= now:  # idle
            self.fired = self.expired(due)
            self._task.cancel()
            return
        # Early (something happened meanwhile), or idle while the handler is elsewhere (its next
        # wait finds the stream due): ring again when it can end next.
        when = due if self.waiting else end
        if when is not None:
            self._alarm = self._loop.call_at(when, self._ring)

    def stop(self) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None

    async def count(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``requests``, counting each as in flight (a request arriving stops the idle clock)."""
        async for message in requests:
            self.inflight += 1
            yield message

    def answered(self) -> None:
        self.inflight = max(0, self.inflight - 1)
        if not self.inflight:
            self.idle_since = time.monotonic()

    def expired(self, when: float | None) -> tuple[grpc.StatusCode, str]:
        """Status and message of a stream that reached ``when`` (its lifetime's end, or idle)."""
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
            task = asyncio.current_task()
            assert task is not None
            cancelling = task.cancelling()
            clock = _StreamClock(self.limits, task)
            try:
                answers = behavior(clock.count(requests), context)
                try:
                    while True:
                        ended = clock.wait()
                        if ended is not None:
                            code, message = ended
                            break
                        try:
                            answer = await anext(answers)
                        except StopAsyncIteration:
                            return
                        except asyncio.CancelledError:
                            # The alarm's, unless the call was cancelled besides (caller gone).
                            if clock.fired is None or task.uncancel() > cancelling:
                                raise
                            code, message = clock.fired
                            break
                        finally:
                            clock.waiting = False
                        yield answer
                        clock.answered()
                finally:
                    await answers.aclose()
                await context.abort(code, message)
            finally:
                clock.stop()
                self._release(peer)

        return ComputeStream

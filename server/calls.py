"""Per-call control: deadline, cancellation and request id, from the RPC down to the engine.

``CallInterceptor`` opens a ``CallControl`` for every Compute/ComputeStream RPC and keeps it in
a context variable; the service attaches it to each ``PreparedCall`` (``attach``), and the
engine checks the call between chunks (``PreparedCall.check``). So work whose deadline has
passed is never started, and work whose caller went away stops at its next chunk and frees its
compute thread. The same interceptor applies the default and maximum deadlines to unary calls,
keeps the in-flight gauge, records per-request metrics and logs each request with its id (at
DEBUG). The server installs it with ``CallInterceptor.wrap`` on the servicer rather than as a
grpc.aio interceptor: the wrapping is the same, and a server without interceptors skips
grpc.aio's per-RPC interceptor pipeline.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from gradserve.server.config import Limits
from gradserve.server.spec import PreparedCall

__all__ = ["CallControl", "CallInterceptor", "current", "attach", "effective_timeout"]

_log = logging.getLogger("gradserve.server.requests")

_COMPUTE = "/gradserve.v1.SensitivityService/Compute"
# Ids for requests that come without one: a random per-process prefix and a counter. uuid4 per
# request read os.urandom, a system call that gives up the GIL; taking it back from a compute
# thread that runs TensorFlow's Python cost the event loop up to a switch interval (5 ms).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)
_COMPUTE_STREAM = "/gradserve.v1.SensitivityService/ComputeStream"


@dataclass
class CallControl:
    """What the engine needs to know about the RPC a computation belongs to."""

    #: ``time.monotonic()`` by which the answer is due; None: no deadline.
    deadline: float | None = None
    #: Set when the caller cancelled or went away.
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: The caller's request id (or one made up by the server), for logs.
    request_id: str = ""

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed); None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()


_CURRENT: contextvars.ContextVar[CallControl | None] = contextvars.ContextVar("gradserve_call", default=None)


def current() -> CallControl | None:
    """The control of the RPC being served by this task, if any."""
    return _CURRENT.get()


def activate(control: CallControl) -> contextvars.Token[CallControl | None]:
    """Make ``control`` current for this task (and the tasks it creates)."""
    return _CURRENT.set(control)


def attach(call: PreparedCall) -> PreparedCall:
    """Give ``call`` the current RPC's deadline and cancellation flag.

    Raises DeadlineExceededError when the deadline has already passed: such work is not started.
    """
    control = _CURRENT.get()
    if control is None:
        return call
    call.deadline = control.deadline
    call.cancelled = control.cancelled
    call.check()
    return call


def effective_timeout(time_remaining: float | None, limits: Limits) -> float:
    """Seconds a unary call may run: the caller's deadline, or the default, cut to the maximum."""
    if time_remaining is None:
        return min(limits.default_deadline_s, limits.max_deadline_s)
    return min(time_remaining, limits.max_deadline_s)


_METHOD_LABELS: dict[int, str] = {}


def _method_label(value: int) -> str:
    # Metric labels must stay a small set: unknown wire values are pooled.
    label = _METHOD_LABELS.get(value)
    if label is not None:
        return label
    from gradserve.server.validation import method_name  # imported late: it imports TensorFlow

    try:
        label = method_name(value)
    except Exception:  # noqa: BLE001 - an invalid method is reported by the servicer
        return "invalid"
    _METHOD_LABELS[value] = label  # only the valid values: the memo stays as small as the enum
    return label


def _model_label(name: str, known: Callable[[], list[str]] | None) -> str:
    # Unknown names are pooled too, so that a caller cannot grow the label set without bound.
    if known is not None and name not in known():
        return "unknown"
    return name


def _batch_of(request: Any) -> int | None:
    for tensor in request.inputs.values():
        return int(tensor.shape[0]) if len(tensor.shape) else None
    return None


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Deadlines, cancellation, metrics and request logs for Compute and ComputeStream.

    Parameters
    ----------
    limits
        ``default_deadline_s`` and ``max_deadline_s`` (unary calls).
    metrics
        A ``ServerMetrics`` to record into, or None.
    model_names
        Returns the names of the hosted models (metric labels of other names are pooled).
    """

    def __init__(self, limits: Limits, metrics: Any = None,
                 model_names: Callable[[], list[str]] | None = None) -> None:
        self._limits = limits
        self._metrics = metrics
        self._models = model_names
        self._wrapped: dict[int, tuple[Any, Any]] = {}
        # Label children looked up once: ``labels()`` takes a lock and builds a key every call.
        self._unary_gauge = metrics.inflight.labels("Compute") if metrics is not None else None
        self._stream_gauge = metrics.inflight.labels("ComputeStream") if metrics is not None else None

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method not in (_COMPUTE, _COMPUTE_STREAM):
            return handler
        # The registered handlers are the same objects on every call: wrap each once.
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = handler
        if details.method == _COMPUTE and handler.unary_unary is not None:
            wrapped = handler._replace(unary_unary=self._unary(handler.unary_unary))
        elif details.method == _COMPUTE_STREAM and handler.stream_stream is not None:
            wrapped = handler._replace(stream_stream=self._stream(handler.stream_stream))
        self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped

    def wrap(self, servicer: Any) -> Any:
        """``servicer`` with its Compute and ComputeStream wrapped as ``intercept_service`` wraps
        them, to register instead of installing this interceptor: a server without interceptors
        skips grpc.aio's interceptor pipeline (a chain of coroutines per RPC)."""
        return _WrappedServicer(servicer, self._unary(servicer.Compute), self._stream(servicer.ComputeStream))

    def _record(self, request: Any, code: grpc.StatusCode | int, seconds: float, request_id: str) -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
        if self._metrics is not None:
            self._metrics.observe_request(_model_label(request.model, self._models), _method_label(request.method),
                                          name, seconds, _batch_of(request))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("request done", extra={"request_id": request_id, "model": request.model[:128],
                                              "code": name, "ms": round(seconds * 1e3, 3)})

    def _unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        limits = self._limits

        async def compute(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            timeout = effective_timeout(context.time_remaining(), limits)
            control = CallControl(time.monotonic() + timeout,
                                  request_id=request.request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):08x}")
            token = activate(control)
            code: grpc.StatusCode = grpc.StatusCode.OK
            gauge = self._unary_gauge
            if gauge is not None:
                gauge.inc()
            try:
                try:
                    async with asyncio.timeout(timeout):
                        return await behavior(request, context)
                except TimeoutError:
                    control.cancelled.set()
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    await context.abort(code, f"deadline: the call ran past its deadline of {timeout:.3f} s")
            except asyncio.CancelledError:
                control.cancelled.set()
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = _code_of(context)
                raise
            finally:
                if gauge is not None:
                    gauge.dec()
                _CURRENT.reset(token)
                self._record(request, code, time.perf_counter() - start, control.request_id)

        return compute

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        limits = self._limits

        async def compute_stream(request_iterator: AsyncIterator[Any],
                                 context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # A stream may legitimately stay open for long: only the caller's own deadline
            # (cut to the maximum) applies to it, not the default.
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + min(remaining, limits.max_deadline_s)
            control = CallControl(deadline)
            activate(control)
            # Responses come back in request order, so each response closes the oldest request.
            started: collections.deque[tuple[Any, float]] = collections.deque()

            async def requests() -> AsyncIterator[Any]:
                async for request in request_iterator:
                    started.append((request, time.perf_counter()))
                    yield request

            gauge = self._stream_gauge
            if gauge is not None:
                gauge.inc()
            try:
                async for response in behavior(requests(), context):
                    if started:
                        request, t0 = started.popleft()
                        self._record(request.request, response.error.code if response.HasField("error") else 0,
                                     time.perf_counter() - t0, request.request.request_id)
                    yield response
            except BaseException:
                # Cancelled, client gone, or the stream failed: stop this stream's work.
                control.cancelled.set()
                raise
            finally:
                if gauge is not None:
                    gauge.dec()

        return compute_stream


class _WrappedServicer:
    """A servicer whose Compute and ComputeStream are replaced (see ``CallInterceptor.wrap``)."""

    def __init__(self, inner: Any, compute: Callable[..., Any], compute_stream: Callable[..., Any]) -> None:
        self._inner = inner
        self.Compute = compute
        self.ComputeStream = compute_stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _code_name(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return "UNKNOWN"


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if code is None else grpc.StatusCode[_code_name(int(code))]

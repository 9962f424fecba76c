"""The call envelope: what every request gets, whatever its protocol.

Every front-end (native Compute and each message of a ComputeStream, the Open Inference
Protocol over gRPC and REST, Analyze) serves a request inside one ``Call``::

    with envelope.open("native", "Compute", context.time_remaining()) as call:
        message = parse(data)
        call.describe(message.model, method, batch, message.request_id)
        call.admit(len(data))                      # limits and memory budget
        result = await call.run(plane.compute(request, call.control))
        return encode(result)
    await context.abort(call.code, call.message)   # only reached when the call failed

The call gives the request:

- its deadline, one carrier for it (``core.control.CallControl``, handed to the data plane):
  the caller's deadline, or the default one, cut to the maximum (``--default-deadline``,
  ``--max-deadline``); ``run`` enforces it with a timer only where the caller's own deadline
  does not already bind (gRPC ends such a call itself);
- cancellation: a caller that goes away, or a deadline that fires, sets ``control.cancelled``,
  and the engine stops at its next chunk;
- its request id (the caller's, or one made up here), which every log record of the request
  carries (``logs``);
- admission (``admission.Admission``): ``--max-concurrent-calls`` for every computing call of
  every protocol and ``--max-concurrent-analyses`` for analyses, RESOURCE_EXHAUSTED past them;
  and the memory budget (``--max-inflight-request-bytes``) for its bytes;
- one request metric family labelled by protocol, model, method and status code, the in-flight
  gauge by protocol and RPC, a DEBUG log line per request, and the model and method as
  attributes of the tracing span (``tracing``).

A failure leaves the ``with`` block with a status (``code``, ``message``) that the front-end
answers in its own way; the caller going away (``asyncio.CancelledError``) is recorded and goes
on. There is no gRPC interceptor: grpc.aio runs a chain of coroutines per RPC for
interceptors, so front-ends open their call directly.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from types import TracebackType
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from gradserve import _names
from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import DeadlineExceededError
from gradserve.server.ops import tracing
from gradserve.server.ops.admission import Admission
from gradserve.server.ops.budget import MemoryBudget
from gradserve.server.ops.status import status_for

__all__ = ["CallEnvelope", "Call", "current", "effective_timeout", "PROTOCOLS"]

_log = logging.getLogger("gradserve.server.requests")

T = TypeVar("T")

#: Values of the ``protocol`` label: the native gradserve.v1 services, and the Open Inference
#: Protocol over gRPC and over REST.
PROTOCOLS = ("native", "oip-grpc", "oip-rest")
#: Method labels: the methods' names; anything else is pooled as "invalid" (labels stay a small set).
_METHOD_LABELS = frozenset(_names.METHODS) | frozenset(_names.ANALYSES)

_OK = grpc.StatusCode.OK
#: Batch labels at least this large are not recorded (a caller's absurd shape, e.g. 1e4000 rows
#: declared over the Open Inference Protocol, would overflow the histogram's float sum).
_MAX_BATCH_LABEL = 2**53

_CURRENT: contextvars.ContextVar[CallControl | None] = contextvars.ContextVar("gradserve_call", default=None)


def current() -> CallControl | None:
    """The control of the call being served by this task, if any (log records read its id)."""
    return _CURRENT.get()


def effective_timeout(time_remaining: float | None, limits: Limits) -> float:
    """Seconds a call may run: the caller's deadline, or the default, cut to the maximum."""
    if time_remaining is None:
        return min(limits.default_deadline_s, limits.max_deadline_s)
    return min(time_remaining, limits.max_deadline_s)


class CallEnvelope:
    """Opens the ``Call`` of every request (see the module docstring); one per server.

    Parameters
    ----------
    limits
        Deadlines, ``max_inflight_request_bytes`` and the admission limits.
    admission
        Counts and limits of calls, analyses and streams.
    metrics
        A ``metrics.ServerMetrics`` to record into, or None.
    hosted
        Whether a model name is hosted: other names are pooled as "unknown" in metric labels,
        so that a caller cannot grow the label set without bound.
    """

    def __init__(self, limits: Limits, admission: Admission | None = None, metrics: Any = None,
                 hosted: Callable[[str], bool] | None = None) -> None:
        self.limits = limits
        self.admission = admission or Admission(limits)
        self.metrics = metrics
        self._hosted = hosted
        #: Request bytes held by the calls in flight (``limits.max_inflight_request_bytes``).
        self.memory = MemoryBudget(limits.max_inflight_request_bytes)
        self._gauges: dict[tuple[str, str], Any] = {}

    def open(self, protocol: str, rpc: str, time_remaining: float | None = None, *,
             deadline: float | None = None, stream: bool = False, in_stream: bool = False) -> Call:
        """The call of one request.

        ``time_remaining``: the caller's deadline in seconds, if it set one (gRPC). ``deadline``:
        an absolute ``time.monotonic()`` deadline instead (the messages of a stream share their
        stream's). ``stream``: the call of a whole stream, which holds its deadline and its place
        in the in-flight gauge while each of its requests is a call of its own (only those are
        counted as requests); a stream may live longer than the default deadline, so without a
        deadline of the caller's only the maximum applies. ``in_stream``: one request of a stream
        (the stream's call holds the in-flight gauge).
        """
        return Call(self, protocol, rpc, time_remaining, deadline, stream, in_stream)

    def gauge(self, protocol: str, rpc: str) -> Any:
        """The in-flight gauge of one protocol's RPC (None without metrics), looked up once."""
        key = (protocol, rpc)
        try:
            return self._gauges[key]
        except KeyError:
            gauge = self._gauges[key] = None if self.metrics is None else self.metrics.inflight_child(protocol, rpc)
            return gauge

    def label(self, model: str) -> str:
        """The metric label of a model name (unknown names pooled)."""
        return model if self._hosted is None or self._hosted(model) else "unknown"


class Call:
    """One request inside the envelope (a synchronous context manager; see the module docstring)."""

    __slots__ = ("_envelope", "protocol", "rpc", "control", "_binds", "_record", "_gauge", "_start", "_token",
                 "model", "method", "batch", "_admitted", "_held", "code", "message")

    def __init__(self, envelope: CallEnvelope, protocol: str, rpc: str, time_remaining: float | None,
                 deadline: float | None, stream: bool, in_stream: bool) -> None:
        self._envelope = envelope
        self.protocol = protocol
        self.rpc = rpc
        self._record = not stream
        self._gauge = None if in_stream else envelope.gauge(protocol, rpc)
        now = time.monotonic()
        if deadline is None:
            limits = envelope.limits
            if time_remaining is None:
                #: Whether the caller's own deadline binds: gRPC then ends the call itself at it.
                self._binds = False
                deadline = now + (limits.max_deadline_s if stream else
                                  min(limits.default_deadline_s, limits.max_deadline_s))
            else:
                timeout = min(time_remaining, limits.max_deadline_s)  # ``effective_timeout``
                self._binds = timeout >= time_remaining
                deadline = now + timeout
        else:
            self._binds = True  # the stream's own timer (``admission``) ends it
        self.control = CallControl(deadline)
        self._start = now
        self._token: contextvars.Token[CallControl | None] | None = None
        self.model = ""
        self.method = "invalid"
        self.batch: int | None = None
        self._admitted: str | None = None
        self._held = 0
        #: The status the call ended with (``grpc.StatusCode.OK`` on success) and its message.
        self.code = _OK
        self.message = ""

    # -- inside the call --------------------------------------------------------------------------
    def describe(self, model: str, method: str, batch: int | None = None, request_id: str = "") -> None:
        """Name the request: its model, method and batch (metric labels and logs) and its id (the
        caller's, or one made up when first needed). A batch outside [0, 2**53) is not recorded."""
        self.model = model
        self.method = method if method in _METHOD_LABELS else "invalid"
        self.batch = batch if batch is None or 0 <= batch < _MAX_BATCH_LABEL else None
        self.control.name(request_id)
        if tracing.ACTIVE:
            tracing.annotate(self.protocol, model, self.method)

    def admit(self, nbytes: int = 0, kind: str | None = "call") -> None:
        """Admit the request: ``kind`` "call" counts against ``--max-concurrent-calls``,
        "analysis" against that and ``--max-concurrent-analyses``, None against neither (the
        messages of a stream, which its window bounds); ``nbytes`` are held against the memory
        budget. ResourceExhaustedError past a limit."""
        if kind is not None:
            self._envelope.admission.enter(kind)
            self._admitted = kind
        if nbytes:
            self._envelope.memory.take(nbytes)
            self._held = nbytes

    def tighten(self, seconds: float) -> None:
        """Shorten the deadline to ``seconds`` from now (Triton's ``timeout`` parameter)."""
        deadline = time.monotonic() + seconds
        if self.control.deadline is None or deadline < self.control.deadline:
            self.control.deadline = deadline
            self._binds = False

    def run(self, work: Awaitable[T]) -> Awaitable[T]:
        """``work`` under the call's deadline: a timer only where the caller's own deadline does
        not bind (otherwise ``work`` itself, awaited as it is); past it, DeadlineExceededError and
        the work is cancelled."""
        if self._binds or self.control.deadline is None:
            return work
        return self._run_timed(work)

    async def _run_timed(self, work: Awaitable[T]) -> T:
        deadline = self.control.deadline
        assert deadline is not None
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except TimeoutError:
            self.control.cancelled.set()
            seconds = deadline - self._start
            raise DeadlineExceededError(f"deadline: the call ran past its deadline of {seconds:.3f} s") from None

    # -- the envelope -----------------------------------------------------------------------------
    def __enter__(self) -> Call:
        self._token = _CURRENT.set(self.control)
        if self._gauge is not None:
            self._gauge.inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        suppress = False
        if exc is not None:
            if isinstance(exc, asyncio.CancelledError):  # the caller went away, or its deadline passed
                self.control.cancelled.set()
                late = self.control.deadline is not None and time.monotonic() >= self.control.deadline
                self.code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
                self.message = "the call was cancelled"
            elif isinstance(exc, Exception):  # mapped to a status in one place
                self.control.cancelled.set()  # whatever of its work is still queued stops
                self.code, self.message = status_for(exc, self.control.request_id)
                suppress = True
        envelope = self._envelope
        if self._admitted is not None:
            envelope.admission.leave(self._admitted)
        if self._held:
            envelope.memory.give(self._held)
        seconds = time.monotonic() - self._start
        if self._gauge is not None:
            self._gauge.dec()
        if self._record:
            code = self.code
            metrics = envelope.metrics
            if metrics is not None:
                if code is _OK:
                    metrics.observe_request(self.protocol, self.model, self.method, "OK", seconds, self.batch)
                else:
                    metrics.observe_request(self.protocol, envelope.label(self.model), self.method, code.name,
                                            seconds, self.batch)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("request done", extra={"protocol": self.protocol, "model": self.model[:128],
                                                  "method": self.method, "code": code.name,
                                                  "ms": round(seconds * 1e3, 3)})
        if self._token is not None:
            _CURRENT.reset(self._token)
        return suppress

"""Per-call control and bookkeeping: deadline, cancellation, request id, metrics and request logs.

The servicers (``service``) open a ``CallControl`` for every Compute call and ComputeStream and
keep it in a context variable (log records read its request id, ``logs``); the data plane
attaches it to each ``PreparedCall`` (``attach``), and the engine checks the call between chunks
(``PreparedCall.check``). So work whose deadline has passed is never started, and work whose
caller went away stops at its next chunk and frees its compute thread. ``effective_timeout``
applies the default and maximum deadlines; ``CallRecorder`` keeps the in-flight gauges, records
per-request metrics and logs each request with its id (at DEBUG). There is no interceptor:
grpc.aio runs a chain of coroutines per RPC for interceptors, so the servicers call these
directly.
"""
from __future__ import annotations

import contextvars
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

from gradserve.server.config import Limits
from gradserve.server.core.spec import PreparedCall

__all__ = ["CallControl", "CallRecorder", "current", "activate", "attach", "effective_timeout", "new_request_id"]

_log = logging.getLogger("gradserve.server.requests")

# Ids for requests that come without one: a random per-process prefix and a counter. uuid4 per
# request read os.urandom, a system call that gives up the GIL; taking it back from a compute
# thread that runs TensorFlow's Python cost the event loop up to a switch interval (5 ms).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """An id for a request that came without one (logs)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


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
    from gradserve.server.dataplane.validation import method_name  # imported late: it imports TensorFlow

    try:
        label = method_name(value)
    except Exception:  # noqa: BLE001 - an invalid method is reported by the servicer
        return "invalid"
    _METHOD_LABELS[value] = label  # only the valid values: the memo stays as small as the enum
    return label


def _batch_of(request: Any) -> int | None:
    for tensor in request.inputs.values():
        return int(tensor.shape[0]) if len(tensor.shape) else None
    return None


class CallRecorder:
    """Metrics and request logs of Compute calls and stream requests.

    Parameters
    ----------
    metrics
        A ``ServerMetrics`` to record into, or None.
    model_names
        Returns the names of the hosted models (metric labels of other names are pooled, so
        that a caller cannot grow the label set without bound).
    """

    def __init__(self, metrics: Any = None, model_names: Callable[[], list[str]] | None = None) -> None:
        self._metrics = metrics
        self._models = model_names
        # Label children looked up once: ``labels()`` takes a lock and builds a key every call.
        self.unary_gauge = metrics.inflight.labels("Compute") if metrics is not None else None
        self.stream_gauge = metrics.inflight.labels("ComputeStream") if metrics is not None else None

    def record(self, request: Any, code: grpc.StatusCode | int, seconds: float, request_id: str,
               served: bool = False) -> None:
        """One finished request; ``request`` is None when it could not be parsed; ``served``: it
        was answered, so its model is a hosted one (no look-up of the model names)."""
        name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
        model = "" if request is None else request.model
        if self._metrics is not None:
            if request is None:
                self._metrics.observe_request("unknown", "invalid", name, seconds, None)
            else:
                label = model if served or self._models is None or model in self._models() else "unknown"
                self._metrics.observe_request(label, _method_label(request.method), name, seconds, _batch_of(request))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("request done", extra={"request_id": request_id, "model": model[:128],
                                              "code": name, "ms": round(seconds * 1e3, 3)})


_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def _code_name(value: int) -> str:
    return _CODE_NAMES.get(value, "UNKNOWN")

"""One call's control: its deadline, its cancellation flag and its request id.

The call envelope (``ops.calls``) makes one ``CallControl`` per request, whatever the protocol;
the data plane attaches it to every engine call it plans (``PreparedCall.control``), and the
batcher and the engine check it between chunks. It is the only carrier of the deadline: work
whose deadline has passed is never started, and work whose caller went away stops at its next
chunk and frees its compute thread.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

from gradserve.server.core.errors import CancelledError, DeadlineExceededError

__all__ = ["CallControl", "Flag", "new_request_id"]

# Ids for requests that come without one: a random per-process prefix and a counter. uuid4 per
# request read os.urandom, a system call that gives up the GIL; taking it back from a compute
# thread that runs TensorFlow's Python cost the event loop up to a switch interval (5 ms).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """An id for a request that came without one (logs)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


class Flag:
    """A flag set once, read between chunks of work (``threading.Event``'s ``set`` and ``is_set``
    without its lock and condition, which cost each request ~1.5 µs; nothing waits on it)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class CallControl:
    """What the work of one request needs to know about the call it belongs to.

    ``deadline``: ``time.monotonic()`` by which the answer is due (None: no deadline).
    ``cancelled``: set when the caller cancelled, went away, or the deadline fired (a ``Flag`` by
    default; anything with ``set`` and ``is_set``, e.g. a ``threading.Event``). ``request_id``: the
    caller's request id, or one made up by the server (for logs).
    """

    __slots__ = ("deadline", "cancelled", "_request_id")

    def __init__(self, deadline: float | None = None, cancelled: Flag | threading.Event | None = None,
                 request_id: str = "") -> None:
        self.deadline = deadline
        self.cancelled: Flag | threading.Event = Flag() if cancelled is None else cancelled
        #: "" until the request is named; None: named without an id, one is made when first read.
        self._request_id: str | None = request_id

    def __repr__(self) -> str:
        return f"CallControl(deadline={self.deadline!r}, cancelled={self.cancelled!r}, request_id={self._request_id!r})"

    @property
    def request_id(self) -> str:
        """The caller's request id, or one made up (``new_request_id``) when first read for a
        request named without one (most requests' ids are never read: only logs and errors
        read them); "" before the request is named (``name``)."""
        rid = self._request_id
        if rid is None:
            rid = self._request_id = new_request_id()
        return rid

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    def name(self, request_id: str) -> None:
        """Name the request by the caller's id, or (empty) by one made up when first read."""
        self._request_id = request_id or None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed); None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise CancelledError or DeadlineExceededError when the work should not go on."""
        if self.cancelled.is_set():
            raise CancelledError("the call was cancelled by the caller")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("deadline: the request's deadline passed before its work finished")

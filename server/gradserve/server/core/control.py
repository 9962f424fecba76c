"""One call's control: its deadline, its cancellation flag and its request id.

The call envelope (``ops.calls``) makes one ``CallControl`` per request, whatever the protocol;
the data plane attaches it to every engine call it plans (``PreparedCall.control``), and the
batcher and the engine check it between chunks. It is the only carrier of the deadline: work
whose deadline has passed is never started, and work whose caller went away stops at its next
chunk and frees its compute thread.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from gradserve.server.core.errors import CancelledError, DeadlineExceededError

__all__ = ["CallControl", "Flag"]


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


@dataclass
class CallControl:
    """What the work of one request needs to know about the call it belongs to."""

    #: ``time.monotonic()`` by which the answer is due; None: no deadline.
    deadline: float | None = None
    #: Set when the caller cancelled, went away, or the deadline fired (a ``Flag``; anything
    #: with ``set`` and ``is_set``, e.g. a ``threading.Event``).
    cancelled: Flag | threading.Event = field(default_factory=Flag)
    #: The caller's request id (or one made up by the server), for logs.
    request_id: str = ""

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed); None without a deadline."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise CancelledError or DeadlineExceededError when the work should not go on."""
        if self.cancelled.is_set():
            raise CancelledError("the call was cancelled by the caller")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("deadline: the request's deadline passed before its work finished")

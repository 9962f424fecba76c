"""The memory budget of requests in flight: decompressed request bytes held by calls being served.

Each request's decompressed size (what gRPC handed over after inflating it) is held from the
moment its work starts until its answer is ready; a request that would take the total past the
budget is refused with RESOURCE_EXHAUSTED instead of queueing its tensors (and the copies made
of them) in memory. When nothing is held, one request is always admitted, so a budget below
``max_message_bytes`` cannot make a lone large request impossible.
"""
from __future__ import annotations

import threading
from typing import Any

from gradserve.server.core.errors import ResourceExhaustedError

__all__ = ["MemoryBudget", "request_bytes"]


def request_bytes(request: Any) -> int:
    """Bytes of a decoded ComputeRequest's tensors, for front-ends that do not have its wire size.

    Not ``ByteSize()``: upb computes that by serializing the message (ms for a 4 MiB tensor).
    """
    return sum(len(t.data) for t in request.inputs.values())


class MemoryBudget:
    """A byte count shared by the calls in flight (thread-safe; 0 or less: no budget)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes held by the requests in flight."""
        return self._held

    def hold(self, nbytes: int) -> "_Hold":
        """``with budget.hold(n):`` holds ``n`` bytes for the block; ResourceExhaustedError past the
        budget (raised on entering)."""
        return _Hold(self, nbytes)

    def _take(self, nbytes: int) -> None:
        with self._lock:
            if 0 < self.limit < self._held + nbytes and self._held:
                raise ResourceExhaustedError(
                    f"memory budget: {nbytes} request bytes on top of the {self._held} held by the calls in "
                    f"flight exceed --max-inflight-request-bytes {self.limit}; retry later")
            self._held += nbytes

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


class _Hold:
    # A plain class, not @contextmanager: it runs once per request on the event loop.
    __slots__ = ("_budget", "_nbytes")

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self._nbytes = nbytes if budget.limit > 0 else 0

    def __enter__(self) -> None:
        if self._nbytes:
            self._budget._take(self._nbytes)

    def __exit__(self, *exc: Any) -> None:
        if self._nbytes:
            self._budget._give(self._nbytes)

"""The memory budget of requests in flight: request bytes held by the calls being served.

Each request's decompressed size (what gRPC handed over after inflating it) is held from the
moment its work starts until its answer is ready; a request that would take the total past the
budget is refused with RESOURCE_EXHAUSTED instead of queueing its tensors (and the copies made
of them) in memory. When nothing is held, one request is always admitted, so a budget below
``max_message_bytes`` cannot make a lone large request impossible.
"""
from __future__ import annotations

import threading

from gradserve.server.core.errors import ResourceExhaustedError

__all__ = ["MemoryBudget"]


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

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes`` more; ResourceExhaustedError when that would pass the budget (a lone
        request is always admitted)."""
        if self.limit <= 0:
            return
        with self._lock:
            if self.limit < self._held + nbytes and self._held:
                raise ResourceExhaustedError(
                    f"memory budget: {nbytes} request bytes on top of the {self._held} held by the calls in "
                    f"flight exceed --max-inflight-request-bytes {self.limit}; retry later")
            self._held += nbytes

    def give(self, nbytes: int) -> None:
        """Give back bytes taken by ``take``."""
        if self.limit <= 0:
            return
        with self._lock:
            self._held -= nbytes


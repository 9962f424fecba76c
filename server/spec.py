"""Plain-data descriptions of a request as it moves through the server (no gRPC, no TF).

``ComputeSpec`` is what validation makes of a ComputeRequest; a method turns it into a
``PreparedCall`` (static key + arrays) that the engine runs; the engine returns a flat dict of
per-example arrays that the service encodes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np

from gradserve.server.errors import CancelledError, DeadlineExceededError

__all__ = ["TargetSpec", "ComputeSpec", "PreparedCall", "INPUT", "OUTPUT", "ATTRIBUTION", "EXTRA",
           "TARGET_INDICES"]

#: Key prefixes in PreparedCall.batched and in engine results.
INPUT = "input/"
OUTPUT = "output/"
ATTRIBUTION = "attribution/"
EXTRA = "extra/"
TARGET_INDICES = "target_indices"


@dataclass(frozen=True)
class TargetSpec:
    """Which scalar per example is differentiated (already resolved against the model)."""

    output: str
    kind: str = "sum"                      # "sum" | "index" | "argmax"
    indices: np.ndarray | None = None      # (batch,) int64, non-negative, for kind "index"
    transform: str = "identity"            # "identity" | "softmax" | "log_softmax" | "sigmoid"
    use_logits: bool = False


@dataclass
class ComputeSpec:
    """A validated ComputeRequest."""

    model: str
    version: int
    method: str
    inputs: dict[str, np.ndarray]
    batch_size: int
    target: TargetSpec | None = None
    wrt: tuple[str, ...] = ()
    #: Whether the caller named wrt; default wrt gives zeros for inputs the target ignores.
    wrt_explicit: bool = False
    include_outputs: bool = False
    request_id: str = ""
    layer: str = ""
    #: Method-specific options, decoded to plain values/arrays by validation.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedCall:
    """One engine call: a static key (selects the compiled function) and its arrays.

    ``batched`` arrays have the batch as their first axis and may be merged with other calls of
    the same key and split back by rows; ``shared`` arrays are the same for every example and
    must be equal for calls to be merged.
    """

    key: tuple[Hashable, ...]
    batched: dict[str, np.ndarray]
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    #: Optional host-side step after the engine (e.g. aggregation across chunks); gets and
    #: returns the flat result dict.
    finish: Any = None
    #: Set when the caller went away: the engine stops at its next chunk (see ``check``).
    cancelled: threading.Event | None = None
    #: ``time.monotonic()`` after which no further chunk is started.
    deadline: float | None = None

    def check(self) -> None:
        """Raise CancelledError or DeadlineExceededError when the work should not go on."""
        if self.cancelled is not None and self.cancelled.is_set():
            raise CancelledError("the call was cancelled by the caller")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError("deadline: the request's deadline passed before its work finished")

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.batched.values())).shape[0]) if self.batched else 0

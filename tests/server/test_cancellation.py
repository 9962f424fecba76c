"""The engine stops a cancelled or expired call between chunks (no sockets)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gradserve.server.compute import methods
from gradserve.server.compute.engine import CompiledModel
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import CancelledError, DeadlineExceededError
from gradserve.server.core.spec import ComputeSpec
from gradserve.server.models import demo
from gradserve.server.models.modelfn import from_keras


class CancelAfter(threading.Event):
    """An Event that becomes set after it has been looked at ``n`` times (counts the checks)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        if self.checks > self.n:
            self.set()
        return super().is_set()


@pytest.fixture(scope="module")
def engine() -> CompiledModel:
    return CompiledModel(from_keras(demo.build_dense2()), EngineConfig(max_bucket=4, xla="off"))


def _call(engine: CompiledModel, rows: int):
    spec = ComputeSpec("dense2", 0, "predict", {"input": np.ones((rows, 4), np.float32)}, rows)
    return methods.get("predict").plan(spec, engine.model, Limits())


def test_cancelled_call_stops_at_the_next_chunk(engine: CompiledModel) -> None:
    call = _call(engine, 40)  # 10 chunks of 4 rows
    call.control = CallControl(cancelled=(flag := CancelAfter(3)))
    with pytest.raises(CancelledError):
        engine.run(call)
    assert flag.checks == 4  # three chunks ran, the fourth was not started
    full = _call(engine, 40)
    full.control = CallControl(cancelled=(flag := CancelAfter(100)))
    out = engine.run(full)
    assert flag.checks == 10
    np.testing.assert_allclose(out["output/alpha"], np.full((40, 1), 2.1), rtol=1e-6)


def test_expired_call_is_not_started() -> None:
    fresh = CompiledModel(from_keras(demo.build_dense2()), EngineConfig(max_bucket=4, xla="off"))
    call = _call(fresh, 8)
    call.control = CallControl(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceededError):
        fresh.run(call)
    assert sum(fresh.trace_counts.values()) == 0  # nothing was traced, let alone run
    fresh.run(_call(fresh, 8))
    assert sum(fresh.trace_counts.values()) == 1

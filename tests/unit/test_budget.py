"""MemoryBudget at its edge: up to the limit exactly, one byte past it refused, a lone request
always admitted, 0 disables it; what a neutral request holds."""
from __future__ import annotations

import numpy as np
import pytest

from gradserve.server.core.errors import ResourceExhaustedError
from gradserve.server.core.requests import ComputeRequest
from gradserve.server.ops.budget import MemoryBudget


def test_up_to_the_limit_exactly_then_refused() -> None:
    budget = MemoryBudget(100)
    budget.take(60)
    budget.take(40)
    assert budget.held == 100
    with pytest.raises(ResourceExhaustedError, match="memory budget.*1 request bytes.*100 held"):
        budget.take(1)
    assert budget.held == 100  # a refused take holds nothing
    budget.give(60)
    budget.give(40)
    assert budget.held == 0


def test_a_lone_request_is_always_admitted() -> None:
    budget = MemoryBudget(100)
    budget.take(500)
    assert budget.held == 500
    with pytest.raises(ResourceExhaustedError):
        budget.take(1)
    budget.give(500)
    assert budget.held == 0


def test_zero_is_no_budget() -> None:
    budget = MemoryBudget(0)
    budget.take(10**12)
    budget.take(10**12)
    assert budget.held == 0  # nothing counted, nothing refused
    budget.give(10**12)
    assert budget.held == 0


def test_a_request_holds_its_wire_size_or_else_its_arrays() -> None:
    inputs = {"a": np.zeros(3, np.float32), "b": np.zeros(30, np.uint8)}
    assert ComputeRequest("m", inputs).held_bytes() == 42
    assert ComputeRequest("m", inputs, nbytes=1000).held_bytes() == 1000

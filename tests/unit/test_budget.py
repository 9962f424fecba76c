"""MemoryBudget at its edge: up to the limit exactly, one byte past it refused, a lone request
always admitted, released on error, 0 disables it."""
from __future__ import annotations

import pytest

from gradserve.server.core.errors import ResourceExhaustedError
from gradserve.server.ops.budget import MemoryBudget, request_bytes


def test_up_to_the_limit_exactly_then_refused() -> None:
    budget = MemoryBudget(100)
    with budget.hold(60), budget.hold(40):
        assert budget.held == 100
        with pytest.raises(ResourceExhaustedError, match="memory budget.*1 request bytes.*100 held"):
            with budget.hold(1):
                pass
    assert budget.held == 0


def test_a_lone_request_is_always_admitted_and_errors_release() -> None:
    budget = MemoryBudget(100)
    with pytest.raises(RuntimeError):
        with budget.hold(500):
            assert budget.held == 500
            raise RuntimeError("the call failed")
    assert budget.held == 0


def test_zero_is_no_budget() -> None:
    budget = MemoryBudget(0)
    with budget.hold(10**12), budget.hold(10**12):
        assert budget.held == 0  # nothing counted, nothing refused


def test_request_bytes_counts_the_tensor_data() -> None:
    from gradserve.v1 import sensitivity_service_pb2 as pb

    req = pb.ComputeRequest(model="m")
    req.inputs["a"].data = b"x" * 12
    req.inputs["b"].data = b"y" * 30
    assert request_bytes(req) == 42

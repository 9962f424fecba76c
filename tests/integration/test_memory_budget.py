"""The memory budget of requests in flight, against a live server: two requests held in the
model fill a budget of exactly two requests; a third Compute is RESOURCE_EXHAUSTED, a stream
request is answered in-band with RESOURCE_EXHAUSTED (the stream goes on), and once the held
requests finish the budget is free again."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import grpc
import numpy as np
import pytest

from gated_model import MARK, Gate
from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc

X = np.full((256, 4), 0.5, np.float32)
HELD = X.copy()
HELD[0, 0] = MARK


def _request(x: np.ndarray) -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="gate", method=pb.METHOD_PREDICT)
    _codec.encode(x, out=req.inputs["x"])
    return req


SIZE = _request(HELD).ByteSize()
assert _request(X).ByteSize() == SIZE


@pytest.fixture()
def gated(start_server: Callable[..., Any]) -> tuple[Any, Gate]:
    from gradserve.server.config import BatchingConfig, EngineConfig, Limits, ServerConfig

    cfg = ServerConfig(limits=Limits(max_inflight_request_bytes=2 * SIZE), compute_threads=3,
                       batching=BatchingConfig(enabled=False), engine=EngineConfig(xla="off", warmup=False,
                                                                                 max_bucket=256))
    gate = Gate()
    srv = start_server(cfg, models={"gate": gate.model})
    assert srv.repository.get("gate").state.name == "READY"
    return srv, gate


def _wait_held(srv: Any, requests: int) -> None:
    """Wait for the server to hold ``requests`` requests (a state, polled; not a timing check).

    A request counts its tensor bytes at least and its whole message at most."""
    end = time.monotonic() + 120
    nbytes = requests * X.nbytes
    while not nbytes <= srv.server.envelope.memory.held <= requests * SIZE:
        assert time.monotonic() < end, f"held {srv.server.envelope.memory.held}, not {requests} requests"
        time.sleep(0.01)


def test_requests_past_the_budget_are_resource_exhausted(gated: tuple[Any, Gate]) -> None:
    srv, gate = gated
    results: list[Any] = []
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        held = [threading.Thread(target=lambda: results.append(stub.Compute(_request(HELD), timeout=120)))
                for _ in range(2)]
        try:
            for t in held:
                t.start()
            _wait_held(srv, 2)  # the budget: both admitted
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(_request(X), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "memory budget" in (info.value.details() or "")
            (answer,) = stub.ComputeStream(iter([pb.ComputeStreamRequest(request=_request(X))]), timeout=60)
            assert answer.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "memory budget" in answer.error.message
        finally:
            gate.release.set()
            for t in held:
                t.join(120)
        assert len(results) == 2
        for r in results:
            np.testing.assert_array_equal(_codec.decode(r.outputs["y"]), HELD)
        _wait_held(srv, 0)
        np.testing.assert_array_equal(_codec.decode(stub.Compute(_request(X), timeout=60).outputs["y"]), X)

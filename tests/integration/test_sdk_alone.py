"""The SDK with nothing but its own dependencies: grpcio, protobuf, NumPy, ml_dtypes.

This module imports no TensorFlow and no server extra, so CI also runs it in a virtual
environment holding the lowest protobuf and grpcio that pyproject's floors allow (the generated
code's oldest runtime), against a server of another environment named by GRADSERVE_TEST_TARGET.
Without that variable it uses the session's in-process demo server.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

import gradserve
from gradserve.v1 import sensitivity_service_pb2 as pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as pb2_grpc
from gradserve.v1 import tensor_pb2


@pytest.fixture(scope="module")
def target(request: Any) -> str:
    return os.environ.get("GRADSERVE_TEST_TARGET") or request.getfixturevalue("demo_server").address


@pytest.fixture()
def sdk(target: str) -> Iterator[gradserve.Client]:
    with gradserve.Client(target, timeout=60) as c:
        yield c


def test_models_and_metadata(sdk):
    assert {"dense2", "cnn", "multi"} <= {m.name for m in sdk.models()}
    inputs = sdk.model_info("dense2").versions[-1].inputs
    assert [(i.name, i.dtype, i.shape) for i in inputs] == [("input", np.dtype("float32"), (-1, 4))]


def test_gradient_and_outputs_of_dense2(sdk):
    x = np.random.default_rng(0).uniform(-2, 2, (5, 4))          # float64, converted to float32
    y, g = sdk.gradient("dense2", x, return_outputs=True)
    assert g.shape == (5, 4) and g.dtype == np.float32
    np.testing.assert_allclose(g, 0.5, rtol=1.2e-7)
    np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-5)


def test_stream_answers_in_order(sdk):
    results = list(sdk.stream("dense2", (np.full((2, 4), i, np.float32) for i in range(20)), method="predict"))
    np.testing.assert_allclose([r[0, 0] for r in results], [2.0 * i + 0.1 for i in range(20)], rtol=1e-5)


def test_errors_arrive_as_their_exceptions(sdk):
    with pytest.raises(gradserve.NotFound, match="nope"):
        sdk.gradient("nope", np.ones((1, 4)))
    with pytest.raises(gradserve.InvalidArgument):
        sdk.gradient("dense2", np.ones((1, 5)))


def test_async_client(target):
    async def main() -> Any:
        async with gradserve.AsyncClient(target, timeout=60) as c:
            return await c.gradient("dense2", np.ones((3, 4)))

    np.testing.assert_allclose(asyncio.run(main()), 0.5, rtol=1.2e-7)


def test_generated_stream_messages_carry_in_band_errors(target):
    """The generated code itself (not the SDK) on this protobuf: a bad request between good ones."""
    def request(request_id: str, columns: int) -> pb2.ComputeStreamRequest:
        x = np.ones((1, columns), "<f4")
        tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes())
        return pb2.ComputeStreamRequest(request=pb2.ComputeRequest(
            model="dense2", method=pb2.METHOD_GRADIENT, request_id=request_id, inputs={"input": tensor}))

    with grpc.insecure_channel(target) as channel:
        answers = list(pb2_grpc.SensitivityServiceStub(channel).ComputeStream(
            iter([request("a", 4), request("b", 3), request("c", 4)]), timeout=60))
    assert [(a.request_id, a.WhichOneof("result")) for a in answers] == [
        ("a", "response"), ("b", "error"), ("c", "response")]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and answers[1].error.message
    for a in (answers[0], answers[2]):
        np.testing.assert_allclose(np.frombuffer(a.response.attributions["input"].data, "<f4"), 0.5, rtol=1.2e-7)

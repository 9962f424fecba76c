"""The foundation end to end: dense2 through the SDK, metadata, health, reflection, first validation."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as pb2_grpc


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 100])
def test_dense2_gradient_is_exactly_half_and_outputs_are_closed_form(client, batch):
    x = np.random.default_rng(batch).uniform(-3, 3, (batch, 4)).astype(np.float32)
    y, g = client.gradient("dense2", x, return_outputs=True)
    assert g.shape == x.shape and g.dtype == np.float32
    # 0.5 = sum of ten float32 products 0.5*0.1; TF's own GradientTape gives the same value, which
    # is exactly 0.5 for small batches and 1 ulp above it where its kernels sum in another order
    # (as LiteRT's XNNPACK kernels do at every batch size).
    np.testing.assert_allclose(g, 0.5, rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(client.gradient("dense2", x), g)


def test_array_likes_are_converted_to_the_model_dtype(client):
    g = client.gradient("dense2", [[1, 2, 3, 4]])            # Python ints -> float32
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, 0.5, rtol=1.2e-7, atol=0)  # 0.5 to the ulp, as in the test above
    y = client.predict("dense2", np.ones((2, 4), np.float64))
    np.testing.assert_allclose(y[:, 0], 2.1, rtol=1e-6)
    with pytest.raises(gradserve.InvalidArgument, match="cannot be converted"):
        client.predict("dense2", np.array([["a", "b", "c", "d"]]))


def test_multi_input_results_mirror_the_caller_structure(client):
    a, b = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
    as_dict = client.gradient("multi", {"a": a, "b": b}, output="y1")
    as_list = client.gradient("multi", [a, b], output="y1")
    assert set(as_dict) == {"a", "b"} and isinstance(as_list, list) and len(as_list) == 2
    np.testing.assert_array_equal(as_list[0], as_dict["a"])
    np.testing.assert_array_equal(as_list[1], as_dict["b"])


def test_models_and_model_info(client):
    names = {m.name for m in client.models()}
    assert {"dense2", "cnn", "multi"} <= names
    info = client.model_info("dense2")
    v = info.versions[-1]
    assert v.state == "READY" and v.version == 1
    assert [(i.name, i.dtype, i.shape) for i in v.inputs] == [("input", np.dtype("float32"), (-1, 4))]
    assert [(o.name, o.shape) for o in v.outputs] == [("alpha", (-1, 1))]
    with pytest.raises(gradserve.NotFound):
        client.model_info("nope")


def test_health_is_serving_overall_and_per_model(demo_server):
    with grpc.insecure_channel(demo_server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dense2", "gradserve.v1.SensitivityService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(demo_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(demo_server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(stub.ServerReflectionInfo(iter([req]), timeout=10)))
        names = {s.name for s in resp.list_services_response.service}
    assert {"gradserve.v1.SensitivityService", "gradserve.v1.ModelService", "grpc.health.v1.Health"} <= names


def _raw_request(**inputs: np.ndarray) -> pb2.ComputeRequest:
    req = pb2.ComputeRequest(model="dense2", method=pb2.METHOD_GRADIENT)
    for name, arr in inputs.items():
        _codec.encode(arr, out=req.inputs[name])
    return req


def _tensor_with(**fields: object) -> pb2.ComputeRequest:
    req = _raw_request(input=np.ones((2, 4), np.float32))
    t = req.inputs["input"]
    for k, v in fields.items():
        if k == "shape":
            del t.shape[:]
            t.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(t, k, v)
    return req


BAD_REQUESTS = {
    "unknown model": (pb2.ComputeRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "missing input": (_raw_request(), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"),
    "extra input": (_raw_request(input=np.ones((1, 4), np.float32), extra=np.ones((1, 4), np.float32)),
                    grpc.StatusCode.NOT_FOUND, "unknown input 'extra'"),  # docs/errors.md: unknown input name
    "unspecified dtype": (_tensor_with(dtype=0), grpc.StatusCode.INVALID_ARGUMENT, "dtype is unspecified"),
    "unknown dtype": (_tensor_with(dtype=77), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype value 77"),
    "dtype mismatch": (_raw_request(input=np.ones((2, 4), np.float64)), grpc.StatusCode.INVALID_ARGUMENT,
                       "got float64, the model expects float32"),
    "rank mismatch": (_raw_request(input=np.ones((2, 4, 1), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                      "rank 3"),
    "fixed dimension": (_raw_request(input=np.ones((2, 5), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                        "dimension 1 is 5"),
    "bytes short": (_tensor_with(data=b"\0" * 28), grpc.StatusCode.INVALID_ARGUMENT, "has 28 bytes"),
    "negative dim": (_tensor_with(shape=[-2, 4]), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_their_status_and_the_server_keeps_serving(demo_server, client, case):
    request, code, text = BAD_REQUESTS[case]
    with grpc.insecure_channel(demo_server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.SensitivityServiceStub(ch).Compute(request, timeout=30)
    assert info.value.code() == code
    assert text in info.value.details()
    assert "inputs" in info.value.details() or case == "unknown model"
    assert len(info.value.details().encode()) <= 1024
    np.testing.assert_allclose(client.gradient("dense2", np.ones((1, 4))), 0.5, rtol=1.2e-7, atol=0)


def test_sdk_raises_typed_errors_with_the_rpc_error_as_cause(client):
    with pytest.raises(gradserve.NotFound) as info:
        client.gradient("nope", np.ones((1, 4)))
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.code == grpc.StatusCode.NOT_FOUND

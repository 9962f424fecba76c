"""Server reflection as a client without our generated code sees it: v1 and v1alpha, service,
message and method names, and a Compute call built from the reflected descriptors alone."""
from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

COMPUTE = "gradserve.v1.SensitivityService.Compute"


class _V1Stub:
    """The reflection stub on grpc.reflection.v1's path. v1's messages are v1alpha's under another
    package name (same fields and numbers), so v1alpha's classes write and read v1's bytes."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


@pytest.fixture(params=["v1", "v1alpha"])
def database(request: Any, demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        if request.param == "v1":
            db._stub = _V1Stub(channel)  # the reference client only knows v1alpha's path
        yield db


def test_services_are_listed(database):
    from gradserve.server.process.app import SERVICE_NAMES

    assert {"gradserve.v1.SensitivityService", "gradserve.v1.ModelService"} <= set(SERVICE_NAMES)
    assert sorted(database.get_services()) == sorted(SERVICE_NAMES + (
        "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"))


@pytest.mark.parametrize("symbol", [
    "gradserve.v1.SensitivityService", COMPUTE, "gradserve.v1.SensitivityService.ComputeStream",
    "gradserve.v1.ComputeRequest", "gradserve.v1.Method", "gradserve.v1.METHOD_GRADIENT",
])
def test_symbols_resolve_to_their_file(database, symbol):
    assert database.FindFileContainingSymbol(symbol).name == "gradserve/v1/sensitivity_service.proto"


def test_every_listed_service_resolves(database):
    pool = descriptor_pool.DescriptorPool(database)
    for name in database.get_services():
        assert pool.FindServiceByName(name).methods, name


@pytest.mark.parametrize("symbol", ["gradserve.v1.SensitivityService.Nope", "gradserve.v1.Nope.Compute",
                                    "gradserve.v1.NoSuchMessage"])
def test_unknown_symbols_are_not_found(database, symbol):
    with pytest.raises(KeyError):
        database.FindFileContainingSymbol(symbol)


def test_a_compute_call_built_from_reflection_alone(database, demo_server):
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindMethodByName(COMPUTE)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    x = np.arange(8, dtype="<f4").reshape(2, 4)
    request = request_class(model="dense2", method="METHOD_GRADIENT", include_outputs=True)
    request.inputs["input"].dtype = pool.FindEnumTypeByName("gradserve.v1.DataType").values_by_name[
        "DATA_TYPE_FLOAT32"].number
    request.inputs["input"].shape.extend(x.shape)
    request.inputs["input"].data = x.tobytes()
    with grpc.insecure_channel(demo_server.address) as channel:
        call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        response = call(request, timeout=30)
    grad, out = response.attributions["input"], response.outputs["alpha"]
    assert list(grad.shape) == [2, 4] and list(out.shape) == [2, 1]
    np.testing.assert_allclose(np.frombuffer(grad.data, "<f4"), 0.5, rtol=1.2e-7)
    np.testing.assert_allclose(np.frombuffer(out.data, "<f4"), 0.5 * x.sum(axis=1) + 0.1, rtol=1e-6)

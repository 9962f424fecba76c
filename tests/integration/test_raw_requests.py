"""Requests as an attacker sends them: raw bytes, absurd shapes, racing deadlines (live server).

Every RPC's request is parsed by the server's own code, so malformed bytes are INVALID_ARGUMENT
with a short message and the log gets at most one line a minute about them; a malformed message
inside a ComputeStream is answered in-band and the stream goes on.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np
import pytest

from gradserve import _codec
from gradserve.v1 import model_service_pb2 as mpb
from gradserve.v1 import sensitivity_service_pb2 as pb

COMPUTE = "/gradserve.v1.SensitivityService/Compute"
STREAM = "/gradserve.v1.SensitivityService/ComputeStream"
LIST = "/gradserve.v1.ModelService/ListModels"
GET = "/gradserve.v1.ModelService/GetModel"
#: Bytes that no protobuf parser accepts: field 1, wire type 2, a length running past the end.
MALFORMED = b"\x0a\xff\x01"


def _identity(b: bytes) -> bytes:
    return b


def _gradient(x: np.ndarray, request_id: str = "") -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, request_id=request_id)
    _codec.encode(x, "input", out=req.inputs["input"])
    return req


@pytest.fixture()
def channel(demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.address) as ch:
        yield ch


@pytest.mark.parametrize("method", [COMPUTE, LIST, GET])
def test_malformed_bytes_are_invalid_argument_and_logged_once(channel: Any, method: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    call = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
    with caplog.at_level(logging.WARNING, logger="gradserve.server"):
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as err:
                call(MALFORMED, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid gradserve.v1." in err.value.details()
            assert "class" not in err.value.details() and "DecodeError" not in err.value.details()
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1


def test_malformed_message_in_a_stream_is_answered_in_band(channel: Any) -> None:
    stream = channel.stream_stream(STREAM, request_serializer=_identity,
                                   response_deserializer=pb.ComputeStreamResponse.FromString)
    x = np.ones((1, 4), np.float32)
    sent = [pb.ComputeStreamRequest(request=_gradient(x, "a")).SerializeToString(), MALFORMED,
            pb.ComputeStreamRequest(request=_gradient(2 * x, "b")).SerializeToString()]
    answers = list(stream(iter(sent), timeout=60))
    assert [a.request_id for a in answers] == ["a", "", "b"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid gradserve.v1.ComputeStreamRequest" in answers[1].error.message
    for a in (answers[0], answers[2]):  # the valid requests around it are still answered
        assert a.WhichOneof("result") == "response"
        np.testing.assert_allclose(_codec.decode(a.response.attributions["input"]), 0.5, rtol=1e-6)


@pytest.mark.parametrize("shape", [[0, 2 ** 63 - 1], [1, 2 ** 40, 0], [2 ** 62, 0]])
def test_absurd_dimensions_are_invalid_argument_before_any_reshape(channel: Any, shape: list[int]) -> None:
    compute = channel.unary_unary(COMPUTE, request_serializer=pb.ComputeRequest.SerializeToString,
                                  response_deserializer=pb.ComputeResponse.FromString)
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    req.inputs["input"].dtype = _codec.dtype_to_wire(np.dtype(np.float32))
    req.inputs["input"].shape.extend(shape)
    with pytest.raises(grpc.RpcError) as err:
        compute(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape" in err.value.details()


def test_list_and_get_model_stay_behind_the_error_mapping(start_server: Any, tmp_path: Any) -> None:
    # A version folder numbered past int64 must never make ListModels/GetModel UNKNOWN or INTERNAL:
    # either the repository skips the folder or the answer is a mapped status.
    import keras

    from gradserve.server.config import ServerConfig

    model = keras.Sequential([keras.Input((2,), name="x"), keras.layers.Dense(1, name="y")])
    for version in ("1", "99999999999999999999"):
        (tmp_path / "m" / version).mkdir(parents=True)
        model.save(str(tmp_path / "m" / version / "model.keras"))
    srv = start_server(ServerConfig(model_dir=str(tmp_path)))
    with grpc.insecure_channel(srv.address) as ch:
        listing = ch.unary_unary(LIST, request_serializer=_identity, response_deserializer=_identity)
        get = ch.unary_unary(GET, request_serializer=mpb.GetModelRequest.SerializeToString,
                             response_deserializer=_identity)
        for call, arg in ((listing, b""), (get, mpb.GetModelRequest(name="m"))):
            try:
                call(arg, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), exc.details()


def test_deadlines_racing_the_answer_give_deadline_exceeded_and_no_traceback(
        demo_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Many calls whose deadlines expire around the time they are answered: each is OK or
    # DEADLINE_EXCEEDED (never a CANCELLED or UNKNOWN of ours), and the server logs no traceback
    # ("Abort already called!", errors raised in the gRPC core).
    rng = np.random.default_rng(0)
    req = _gradient(np.ones((64, 4), np.float32)).SerializeToString()

    async def main() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(demo_server.address) as ch:
            compute = ch.unary_unary(COMPUTE, request_serializer=_identity, response_deserializer=_identity)

            async def one(timeout: float) -> grpc.StatusCode:
                try:
                    await compute(req, timeout=timeout)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            return await asyncio.gather(*(one(float(t)) for t in rng.uniform(0.1, 0.4, 400)))

    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(main())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, set(codes)
    assert not [r for r in caplog.records if r.exc_info or "Abort already called" in r.getMessage()]

"""The global sensitivity and Open Inference Protocol services parse their request bytes in our
code (``server/rawbytes.py``): malformed bytes are INVALID_ARGUMENT with a short message and at
most one log line a minute, never gRPC's UNKNOWN with the exception class; valid bytes are served.
"""
from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as triton

from gradserve.v1 import global_sensitivity_service_pb2 as gpb

ANALYZE = "/gradserve.v1.GlobalSensitivityService/Analyze"
OIP = "/inference.GRPCInferenceService/"
#: Field 1, wire type 2, a length running past the end: no parser accepts it.
MALFORMED = b"\x0a\xff\x01"


def _identity(b: bytes) -> bytes:
    return b


@pytest.fixture()
def channel(demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.address) as ch:
        yield ch


@pytest.mark.parametrize("path", [ANALYZE] + [OIP + name for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")])
def test_malformed_bytes_are_invalid_argument_and_logged_once(channel: Any, path: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    call = (channel.unary_stream if path == ANALYZE else channel.unary_unary)(
        path, request_serializer=_identity, response_deserializer=_identity)
    with caplog.at_level(logging.WARNING, logger="gradserve.server"):
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as err:
                result = call(MALFORMED, timeout=30)
                if path == ANALYZE:
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = err.value.details() or ""
            assert details.startswith("request: not a valid ") and details.endswith(" message")
            assert "class" not in details and "DecodeError" not in details
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1


def test_valid_bytes_are_still_served(channel: Any) -> None:
    # dense2 is linear with d y / dx = 0.5: its mean squared gradient (DGSM's vi) is 0.25 per factor.
    analyze = gpb.AnalyzeRequest(model="dense2", method=gpb.ANALYSIS_METHOD_DGSM, samples=16, seed=1,
                                 factors=[gpb.Factor(name=f"x{i}", input="input", index=i,
                                                     distribution=gpb.DISTRIBUTION_UNIFORM, params=[0.0, 1.0])
                                          for i in range(4)])
    answers = list(channel.unary_stream(ANALYZE, request_serializer=gpb.AnalyzeRequest.SerializeToString,
                                        response_deserializer=gpb.AnalyzeResponse.FromString)(analyze, timeout=60))
    assert answers[-1].WhichOneof("response") == "result"
    np.testing.assert_allclose(answers[-1].result.dgsm.vi, 0.25, rtol=1e-5)
    infer = triton.ModelInferRequest(model_name="dense2")
    inp = infer.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    inp.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    infer.parameters["method"].string_param = "gradient"
    resp = channel.unary_unary(OIP + "ModelInfer", request_serializer=triton.ModelInferRequest.SerializeToString,
                               response_deserializer=triton.ModelInferResponse.FromString)(infer, timeout=60)
    gradients = [np.frombuffer(raw, np.float32) for out, raw in zip(resp.outputs, resp.raw_output_contents)
                 if out.name == "attributions/input"]
    np.testing.assert_allclose(gradients[0], 0.5, rtol=1e-6)

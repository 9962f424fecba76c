"""Request validation at the wire: every malformed field gets its status from docs/errors.md's error
model and a short message naming the field, and the server keeps serving afterwards.

Requests are raw protobuf messages sent through the generated stub on a plain channel, so that
the SDK's own pre-checks cannot hide what the server does.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import grpc
import numpy as np
import pytest

from gradserve import _codec
from gradserve.v1 import model_service_pb2, model_service_pb2_grpc, tensor_pb2
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc

DT = tensor_pb2.DataType
IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
#: Payload bytes: never to be echoed in an error message.
MARK = b"PAYLOAD!"


def raw_tensor(shape: list[int], dtype: int = DT.DATA_TYPE_FLOAT32, nbytes: int | None = None) -> tensor_pb2.Tensor:
    """A tensor whose data is MARK repeated (``nbytes`` long; default: what the shape needs)."""
    if nbytes is None:
        nbytes = max(0, math.prod(shape)) * _codec.DTYPES.get(dtype, np.dtype("f4")).itemsize
    data = (MARK * (nbytes // len(MARK) + 1))[:nbytes]
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def request(model: str = "dense2", **inputs: tensor_pb2.Tensor) -> pb.ComputeRequest:
    """A gradient request; dense2 with a valid (2, 4) input unless inputs are given."""
    req = pb.ComputeRequest(model=model, method=pb.METHOD_GRADIENT, request_id="validation")
    for name, t in (inputs or {"input": raw_tensor([2, 4])}).items():
        req.inputs[name].CopyFrom(t)
    return req


def multi_request(a: list[int], b: list[int] | None) -> pb.ComputeRequest:
    inputs = {"a": raw_tensor(a)}
    if b is not None:
        inputs["b"] = raw_tensor(b)
    return request("multi", **inputs)


def with_(req: pb.ComputeRequest, fn: Callable[[pb.ComputeRequest], Any]) -> pb.ComputeRequest:
    fn(req)
    return req


def set_input(shape: list[int] | None = None, dtype: int = DT.DATA_TYPE_FLOAT32,
              nbytes: int | None = None) -> pb.ComputeRequest:
    return request(input=raw_tensor([2, 4] if shape is None else shape, dtype, nbytes))


@pytest.fixture(scope="module")
def channel(demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: Any) -> Any:
    return pb_grpc.SensitivityServiceStub(channel)


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., Any]) -> Any:
    """A dense2-only server with small limits, NaN/Inf refused and two concurrent RPCs at most."""
    from gradserve.server.config import Limits, ServerConfig
    from gradserve.server.models import demo

    limits = Limits(max_message_bytes=64 * 1024, max_batch=64, max_elements=64, max_jacobian_elements=16,
                    reject_nonfinite=True, max_concurrent_rpcs=2)
    config = ServerConfig(limits=limits)
    srv = start_server(config, models={"dense2": demo.build_dense2})
    with grpc.insecure_channel(srv.address) as channel:
        yield pb_grpc.SensitivityServiceStub(channel)


def assert_valid_succeeds(stub: Any) -> None:
    """After any refusal, a valid request is answered correctly (d output / dx = 0.5)."""
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(np.arange(8, dtype=np.float32).reshape(2, 4), out=req.inputs["input"])
    resp = stub.Compute(req, timeout=60)
    np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), np.full((2, 4), 0.5), rtol=1e-6)


def assert_refused(stub: Any, req: pb.ComputeRequest, code: grpc.StatusCode, field: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(req, timeout=60)
    err = info.value
    details = err.details() or ""
    assert err.code() == code, details
    assert field in details, details
    assert len(details.encode()) <= 1024
    assert MARK.decode() not in details and "Traceback" not in details
    assert_valid_succeeds(stub)
    return details


def _ig(steps: int) -> pb.ComputeRequest:
    req = set_input()
    req.method = pb.METHOD_INTEGRATED_GRADIENTS
    req.integrated_gradients.steps = steps
    return req


def _sg(samples: int) -> pb.ComputeRequest:
    req = set_input()
    req.method = pb.METHOD_SMOOTHGRAD
    req.smoothgrad.samples = samples
    return req


# (id, request factory, status, text the message must contain)
DEMO_CASES: list[tuple[str, Callable[[], pb.ComputeRequest], grpc.StatusCode, str]] = [
    ("dtype-unspecified", lambda: set_input(dtype=DT.DATA_TYPE_UNSPECIFIED, nbytes=32), IA, "inputs['input'].dtype"),
    ("dtype-unknown", lambda: set_input(dtype=99, nbytes=32), IA, "inputs['input'].dtype"),
    ("dtype-mismatch", lambda: set_input(dtype=DT.DATA_TYPE_FLOAT64), IA, "inputs['input'].dtype"),
    ("dtype-int-for-float", lambda: set_input(dtype=DT.DATA_TYPE_INT32), IA, "inputs['input'].dtype"),
    ("data-too-short", lambda: set_input(nbytes=31), IA, "inputs['input'].data"),
    ("data-too-long", lambda: set_input(nbytes=33), IA, "inputs['input'].data"),
    ("data-empty", lambda: set_input(nbytes=0), IA, "inputs['input'].data"),
    ("dimension-negative", lambda: set_input([2, -4], nbytes=32), IA, "inputs['input'].shape"),
    ("dimension-minus-one", lambda: set_input([-1, 4], nbytes=32), IA, "inputs['input'].shape"),
    ("overflow-batch", lambda: set_input([2**62, 4], nbytes=32), IA, "inputs['input'].shape"),
    ("overflow-inner", lambda: set_input([4, 2**62], nbytes=32), IA, "inputs['input'].shape"),
    ("overflow-int64-max", lambda: set_input([1, 2**63 - 1], nbytes=32), IA, "inputs['input'].shape"),
    ("rank-over-limit", lambda: set_input([2, 4] + [1] * 8, nbytes=32), IA, "rank"),
    ("rank-different", lambda: set_input([2, 4, 1]), IA, "rank 3"),
    ("rank-scalar", lambda: set_input([], nbytes=4), IA, "inputs['input'].shape"),
    ("fixed-dimension", lambda: set_input([2, 5]), IA, "dimension 1"),
    ("batch-differs", lambda: multi_request([2, 3], [3, 2]), IA, "batch size"),
    ("batch-over-limit", lambda: set_input([65537, 4]), IA, "exceeds the limit"),
    ("batch-empty", lambda: set_input([0, 4]), IA, "empty"),
    ("input-missing", lambda: multi_request([2, 3], None), IA, "missing input 'b'"),
    ("input-extra", lambda: request(input=raw_tensor([2, 4]), extra=raw_tensor([2, 4])), NF, "inputs"),
    ("input-none", lambda: pb.ComputeRequest(model="dense2"), IA, "missing input"),
    ("model-unknown", lambda: request("no_such_model"), NF, "model"),
    ("model-empty", lambda: request(""), IA, "model"),
    ("model-dotdot", lambda: request("../dense2"), IA, "model"),
    ("model-dotdot-alone", lambda: request(".."), IA, "model"),
    ("model-slash", lambda: request("models/dense2"), IA, "model"),
    ("model-backslash", lambda: request("..\\dense2"), IA, "model"),
    ("model-nul", lambda: request("dense2\0"), IA, "model"),
    ("model-long", lambda: request("m" * 5000), IA, "model"),
    ("version-unknown", lambda: with_(set_input(), lambda r: setattr(r, "version", 7)), NF, "version"),
    ("version-negative", lambda: with_(set_input(), lambda r: setattr(r, "version", -1)), IA, "version"),
    ("method-unknown", lambda: with_(set_input(), lambda r: setattr(r, "method", 99)), IA, "method"),
    ("output-unknown", lambda: with_(set_input(), lambda r: setattr(r.target, "output_name", "nope")), NF,
     "target.output_name"),
    ("output-index", lambda: with_(set_input(), lambda r: setattr(r.target, "output_index", 3)), NF,
     "target.output_index"),
    ("layer-unknown", lambda: with_(set_input(), lambda r: setattr(r, "layer", "no_such_layer")), NF, "layer"),
    ("wrt-unknown", lambda: with_(set_input(), lambda r: r.wrt.append("nope")), NF, "wrt"),
    ("wrt-duplicate", lambda: with_(set_input(), lambda r: r.wrt.extend(["input", "input"])), IA, "wrt"),
    ("target-kind-unknown", lambda: with_(set_input(), lambda r: setattr(r.target, "kind", 42)), IA, "target.kind"),
    ("target-index-high", lambda: with_(set_input(), lambda r: (setattr(r.target, "kind", pb.TARGET_KIND_INDEX),
                                                                r.target.indices.append(1))), IA, "target.indices"),
    ("target-index-low", lambda: with_(set_input(), lambda r: (setattr(r.target, "kind", pb.TARGET_KIND_INDEX),
                                                               r.target.indices.append(-2))), IA, "target.indices"),
    ("target-index-count", lambda: with_(set_input(), lambda r: (setattr(r.target, "kind", pb.TARGET_KIND_INDEX),
                                                                 r.target.indices.extend([0, 0, 0]))),
     IA, "target.indices"),
    ("target-index-cnn", lambda: with_(request("cnn", image=raw_tensor([1, 16, 16, 1])),
                                       lambda r: (setattr(r.target, "kind", pb.TARGET_KIND_INDEX),
                                                  r.target.indices.append(10))), IA, "target.indices"),
    ("steps-negative", lambda: _ig(-1), IA, "integrated_gradients.steps"),
    ("steps-over-cap", lambda: _ig(1025), IA, "integrated_gradients.steps"),
    ("samples-negative", lambda: _sg(-1), IA, "smoothgrad.samples"),
    ("samples-over-cap", lambda: _sg(1025), IA, "smoothgrad.samples"),
]


@pytest.mark.parametrize("make,code,field", [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES])
def test_refused_on_demo_server(stub: Any, make: Callable[[], pb.ComputeRequest], code: grpc.StatusCode,
                                field: str) -> None:
    assert_refused(stub, make(), code, field)


def test_stream_answers_each_bad_request_in_band(stub: Any) -> None:
    reqs = [make() for _, make, _, _ in DEMO_CASES[:10]] + [set_input()]
    responses = list(stub.ComputeStream(iter(pb.ComputeStreamRequest(request=r) for r in reqs), timeout=60))
    assert len(responses) == len(reqs)
    for (_, _, code, field), resp in zip(DEMO_CASES[:10], responses):
        assert resp.error.code == code.value[0] and field in resp.error.message
        assert MARK.decode() not in resp.error.message and len(resp.error.message.encode()) <= 1024
    assert not responses[-1].HasField("error") and "input" in responses[-1].response.attributions


def test_nan_and_inf_are_served_by_default(stub: Any) -> None:
    x = np.array([[np.nan, 1, 2, 3], [np.inf, -np.inf, 0, 1]], np.float32)
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, include_outputs=True)
    _codec.encode(x, out=req.inputs["input"])
    resp = stub.Compute(req, timeout=60)
    # The gradient of a linear model does not depend on x: 0.5 even where x is not finite.
    np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), np.full((2, 4), 0.5), rtol=1e-6)
    assert not np.isfinite(_codec.decode(resp.outputs["alpha"])).any()


def test_duplicate_map_entries_follow_protobuf_semantics(channel: Any) -> None:
    # A map field cannot hold a key twice once parsed; on the wire a repeated key means the
    # last entry wins (the protobuf rule). Build such bytes by hand and check the server uses
    # the last entry: predict returns 0.5 * sum(x) + 0.1 of the second tensor.
    first, second = (pb.ComputeRequest(model="dense2", method=pb.METHOD_PREDICT) for _ in range(2))
    _codec.encode(np.zeros((1, 4), np.float32), out=first.inputs["input"])
    _codec.encode(np.ones((1, 4), np.float32), out=second.inputs["input"])
    wire = first.SerializeToString() + second.SerializeToString()
    call = channel.unary_unary(
        "/gradserve.v1.SensitivityService/Compute", request_serializer=lambda b: b,
        response_deserializer=pb.ComputeResponse.FromString)
    resp = call(wire, timeout=60)
    np.testing.assert_allclose(_codec.decode(resp.outputs["alpha"]), [[2.1]], rtol=1e-6)


def test_empty_stream_is_answered_with_an_empty_stream(stub: Any) -> None:
    call = stub.ComputeStream(iter(()), timeout=60)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_elements_over_limit(limited: Any) -> None:
    assert_refused(limited, set_input([20, 4]), IA, "inputs['input'].shape")


def test_message_over_size_limit_is_resource_exhausted(limited: Any) -> None:
    # 80 KB of float32 against a 64 KiB limit: refused by gRPC before it is parsed.
    with pytest.raises(grpc.RpcError) as info:
        limited.Compute(set_input([5000, 4]), timeout=60)
    assert info.value.code() == RE
    assert MARK.decode() not in (info.value.details() or "")
    assert_valid_succeeds(limited)


def test_nonfinite_refused_when_configured(limited: Any) -> None:
    for bad in (np.nan, np.inf, -np.inf):
        req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
        _codec.encode(np.array([[1, 2, bad, 3]], np.float32), out=req.inputs["input"])
        assert_refused(limited, req, IA, "NaN or Inf")


def test_jacobian_over_size_guard(limited: Any) -> None:
    req = set_input([5, 4])  # 5 examples x 1 output x 4 inputs = 20 > 16
    req.method = pb.METHOD_JACOBIAN
    assert_refused(limited, req, IA, "jacobian")


def test_concurrent_rpcs_over_limit_are_resource_exhausted(limited: Any) -> None:
    # Two open streams hold both RPC slots; a third call is refused, and served once they close.
    release = threading.Event()

    def held() -> Any:
        yield pb.ComputeStreamRequest(request=set_input())
        release.wait(60)

    def open_held() -> Any:
        # A call that just finished may hold its slot for a moment longer: retry until served.
        for _ in range(100):
            stream = limited.ComputeStream(held(), timeout=60)
            try:
                next(stream)
                return stream
            except grpc.RpcError as err:
                if err.code() != RE:
                    raise
                time.sleep(0.05)
        raise AssertionError("no RPC slot became free")

    streams: list[Any] = []
    try:
        streams = [open_held(), open_held()]  # both slots are held by streams being served
        with pytest.raises(grpc.RpcError) as info:
            limited.Compute(set_input(), timeout=60)
        assert info.value.code() == RE
    finally:
        release.set()
        for s in streams:
            assert list(s) == []
    assert_valid_succeeds(limited)


@pytest.mark.parametrize("name,code", [("../dense2", IA), ("a/b", IA), ("", IA), ("no_such_model", NF)])
def test_model_service_refuses_bad_names(channel: Any, name: str, code: grpc.StatusCode) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(model_service_pb2.GetModelRequest(name=name), timeout=60)
    assert info.value.code() == code and "name" in (info.value.details() or "")
    assert stub.GetModel(model_service_pb2.GetModelRequest(name="dense2"), timeout=60).model.name == "dense2"


def test_a_request_of_a_kind_already_served_is_checked_like_the_first(stub: Any) -> None:
    """The data plane checks a kind's first request in full and later ones of that kind (same
    model, method, target, input names, dtypes and shapes less the batch) for their batch only
    (dataplane/plane.py): a later bad one still gets the full check's status and message."""
    assert stub.Compute(multi_request([2, 3], [2, 2]), timeout=60).attributions  # the kind's first
    assert stub.Compute(multi_request([5, 3], [5, 2]), timeout=60).attributions  # the short path
    assert_refused(stub, multi_request([2, 3], [3, 2]), IA, "inputs['b'].shape: batch size 3 differs from the "
                                                            "other inputs' 2")
    assert_refused(stub, multi_request([0, 3], [0, 2]), IA, "the batch is empty")

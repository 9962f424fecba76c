"""Property-based fuzzing of ComputeRequest against the live demo server (hypothesis).

Whatever the request, the server answers it (a result or a status from the error model) and
never with UNKNOWN or INTERNAL; it keeps serving valid requests afterwards. Requests are built
near the models' real signatures so that many get deep into validation or are valid, then bent:
wrong dtypes, odd shapes (negative, huge, overflowing), byte counts, names, options and enums.
Each hypothesis example sends a batch of requests as concurrent unary calls and again over one
stream, so a run sends several thousand requests in a few seconds.
"""
from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from gradserve.v1 import tensor_pb2

#: Demo model -> {input name: shape without the batch dimension} (all float32).
MODELS = {"dense2": {"input": (4,)}, "cnn": {"image": (16, 16, 1)}, "multi": {"a": (3,), "b": (2,)}}
OUTPUTS = ["alpha", "probs", "y1", "y2", "nope", ""]
LAYERS = ["", "layer_1", "conv2", "gap", "tanh", "nope", "../x"]
EXAMPLES = 60
PER_EXAMPLE = 20
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

names = st.sampled_from(["input", "image", "a", "b", "x", "", "input\0", "ü" * 3])
model_names = st.one_of(st.sampled_from(list(MODELS)), st.sampled_from(["", "..", "../dense2", "a/b", "nope"]),
                        st.text(max_size=20))
odd_dims = st.sampled_from([-(2**63), -2, -1, 0, 1, 2, 3, 4, 5, 16, 2**31, 2**62, 2**63 - 1])
enum_values = st.integers(min_value=-3, max_value=14)
counts = st.sampled_from([-1, 0, 1, 2, 3, 1025, 2**31 - 1])
#: Whether to bend one more part of a request (about one time in six).
bent = st.integers(0, 5).map(lambda v: v == 0)


@st.composite
def tensors(draw: Any, inner: tuple[int, ...], batch: int) -> tensor_pb2.Tensor:
    """A tensor for an input of per-example shape ``inner``: valid, or bent in one or more ways."""
    dtype = draw(enum_values) if draw(bent) else tensor_pb2.DataType.DATA_TYPE_FLOAT32
    shape = [batch, *inner]
    if draw(bent):
        shape = draw(st.one_of(
            st.lists(odd_dims, max_size=10),
            st.just([batch, *inner[:-1], inner[-1] + 1]),
            st.just([batch, *inner, 1]),
        ))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    itemsize = _codec.DTYPES[dtype].itemsize if dtype in _codec.DTYPES else 4
    if 0 <= count <= 4096 and not draw(bent):
        kind = draw(st.sampled_from(["normal", "normal", "nonfinite", "bytes"]))
        if kind == "bytes" or dtype not in _codec.DTYPES:
            data = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
        else:
            values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(size=count)
            if kind == "nonfinite" and count:
                values[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            with np.errstate(invalid="ignore", over="ignore"):
                data = values.astype(_codec.DTYPES[dtype]).tobytes()
        data = data[: len(data) - int(draw(bent))]
    else:
        data = draw(st.binary(max_size=64))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def requests(draw: Any) -> pb.ComputeRequest:
    model = draw(st.sampled_from(list(MODELS)))
    batch = draw(st.integers(0, 4))
    req = pb.ComputeRequest(model=model, method=draw(enum_values if draw(bent) else st.integers(0, 10)),
                            include_outputs=draw(st.booleans()), request_id=draw(st.text(max_size=8)))
    inputs = dict(MODELS[model])
    if draw(bent):
        inputs = {draw(names): (4,) for _ in range(draw(st.integers(0, 3)))}
    for name, inner in inputs.items():
        req.inputs[name].CopyFrom(draw(tensors(inner, batch)))
    if draw(bent):
        req.model = draw(model_names)
    if draw(bent):
        req.version = draw(st.sampled_from([-1, 1, 2, 2**62]))
    if draw(bent):
        t = req.target
        t.kind = draw(enum_values)
        t.indices.extend(draw(st.lists(st.sampled_from([-(2**63), -11, -1, 0, 1, 9, 10, 2**62]), max_size=5)))
        t.transform = draw(enum_values)
        t.use_logits = draw(st.booleans())
        if draw(st.booleans()):
            t.output_name = draw(st.sampled_from(OUTPUTS))
        else:
            t.output_index = draw(st.sampled_from([-1, 0, 1, 2, 2**31 - 1]))
    if draw(bent):
        req.wrt.extend(draw(st.lists(names, max_size=3)))
    if draw(bent):
        req.layer = draw(st.sampled_from(LAYERS))
    if draw(st.integers(0, 3)) == 0:
        ig = req.integrated_gradients
        ig.steps = draw(counts)
        ig.quadrature = draw(enum_values)
        ig.return_delta = draw(st.booleans())
        for name, inner in list(inputs.items())[: draw(st.integers(0, 2))]:
            ig.baselines[name].CopyFrom(draw(tensors(inner, draw(st.sampled_from([1, batch])))))
    if draw(st.integers(0, 3)) == 0:
        sg = req.smoothgrad
        sg.samples = draw(counts)
        if draw(st.booleans()):
            sg.noise = draw(st.sampled_from([-1.0, 0.0, 0.1, float("nan"), float("inf")]))
        if draw(st.booleans()):
            sg.stdev = draw(st.sampled_from([-1.0, 0.0, 0.5, float("inf")]))
        sg.kind = draw(enum_values)
        sg.base_method = draw(enum_values)
        if draw(st.booleans()):
            sg.seed = draw(st.integers(-(2**63), 2**63 - 1))
    if draw(bent):
        for name, inner in inputs.items():
            req.tangents[name].CopyFrom(draw(tensors(inner, batch)))
    if draw(bent):
        req.cotangent.CopyFrom(draw(tensors((1,), batch)))
    if draw(bent):
        req.grad_cam.upsample = draw(st.booleans())
    return req


@pytest.fixture(scope="module")
def stub(demo_server: Any) -> Any:
    with grpc.insecure_channel(demo_server.address) as channel:
        yield pb_grpc.SensitivityServiceStub(channel)


def test_fuzzed_requests_never_crash_the_server(stub: Any) -> None:
    outcomes: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(requests(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def check(batch: list[pb.ComputeRequest]) -> None:
        futures = [stub.Compute.future(r, timeout=120) for r in batch]
        for req, fut in zip(batch, futures):
            try:
                fut.result()
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                assert len((err.details() or "").encode()) <= 1024
            assert code not in FORBIDDEN, (code, fut.exception().details(), req)  # type: ignore[union-attr]
            outcomes[code.name] = outcomes.get(code.name, 0) + 1
        responses = list(stub.ComputeStream(iter(pb.ComputeStreamRequest(request=r) for r in batch), timeout=120))
        assert len(responses) == len(batch)
        for req, resp in zip(batch, responses):
            assert resp.error.code not in {c.value[0] for c in FORBIDDEN}, (resp.error, req)
            name = grpc.StatusCode.OK.name if not resp.HasField("error") else f"stream-{resp.error.code}"
            outcomes[name] = outcomes.get(name, 0) + 1

    check()
    print("fuzz outcomes:", outcomes)
    assert sum(outcomes.values()) >= 2000, outcomes
    # Not only refusals: the generator reaches valid requests and several error classes.
    assert outcomes.get("OK", 0) > 0 and outcomes.get("INVALID_ARGUMENT", 0) > 0, outcomes
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(np.ones((3, 4), np.float32), out=req.inputs["input"])
    np.testing.assert_allclose(_codec.decode(stub.Compute(req, timeout=60).attributions["input"]), 0.5, rtol=1e-6)

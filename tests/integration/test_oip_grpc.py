"""The Open Inference Protocol over gRPC, called with tritonclient.grpc on the demo models.

Values are checked against closed forms (dense2: output 0.5·Σx + 0.1, gradient 0.5) or against
the native SDK's answer on the same input; errors against the native API's status and message
for the same request.
"""
from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def triton(demo_server: Any) -> Any:
    client = tritonclient_grpc.InferenceServerClient(demo_server.address)
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str = "FP32") -> Any:
    inp = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def _native_error(address: str, request: pb.ComputeRequest) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SensitivityServiceStub(channel).Compute(request, timeout=60)
    return info.value.code(), info.value.details()


def _oip_error(triton: Any, model: str, inputs: list[Any], **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, inputs, **kwargs)
    return info.value.status(), info.value.message()


def test_health_and_server_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("dense2") and triton.is_model_ready("dense2", "1")
    assert not triton.is_model_ready("no_such_model") and not triton.is_model_ready("dense2", "7")
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "gradserve" and "parameters" in meta["extensions"]


def test_model_metadata_lists_attribution_outputs(triton: Any) -> None:
    meta = triton.get_model_metadata("dense2", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["alpha"]["shape"] == ["-1", "1"]
    assert outputs["attributions/input"] == {"name": "attributions/input", "datatype": "FP32", "shape": ["-1", "4"]}
    assert {"extras/delta", "target_indices"} <= set(outputs)
    multi = triton.get_model_metadata("multi", as_json=True)
    assert {"y1", "y2", "attributions/a", "attributions/b"} <= {o["name"] for o in multi["outputs"]}
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_predict_is_the_closed_form(triton: Any) -> None:
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    result = triton.infer("dense2", [_input("input", x)], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("alpha")[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["alpha"]  # predict: the model's outputs only


def test_gradient_with_outputs_by_name(triton: Any) -> None:
    x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    outputs = [tritonclient_grpc.InferRequestedOutput(n) for n in ("attributions/input", "alpha")]
    result = triton.infer("dense2", [_input("input", x)], outputs=outputs, parameters={"method": "gradient"})
    np.testing.assert_allclose(result.as_numpy("attributions/input"), 0.5, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("alpha")[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    assert [o.name for o in result.get_response().outputs] == ["attributions/input", "alpha"]


def test_integrated_gradients_match_the_sdk(triton: Any, client: Any) -> None:
    images = np.random.default_rng(2).random((2, 16, 16, 1), dtype=np.float32)
    result = triton.infer("cnn", [_input("image", images)],
                          parameters={"method": "integrated_gradients", "target": "argmax", "steps": 16,
                                      "baseline": 0.0, "quadrature": "riemann_trapezoid"})
    expected = client.integrated_gradients("cnn", images, target="argmax", steps=16, baseline=0.0,
                                           quadrature="riemann_trapezoid")
    np.testing.assert_allclose(result.as_numpy("attributions/image"), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.as_numpy("target_indices"),
                                  client.predict("cnn", images).argmax(axis=-1))


def test_integrated_gradients_delta_and_smoothgrad(triton: Any, client: Any) -> None:
    x = np.random.default_rng(3).random((4, 4), dtype=np.float32)
    result = triton.infer("dense2", [_input("input", x)],
                          parameters={"method": "integrated_gradients", "steps": 8, "return_delta": True})
    np.testing.assert_allclose(result.as_numpy("attributions/input"), 0.5 * x, rtol=1e-5, atol=1e-6)
    assert np.abs(result.as_numpy("extras/delta")).max() < 1e-4  # completeness
    images = np.random.default_rng(4).random((1, 16, 16, 1), dtype=np.float32)
    params = {"method": "smoothgrad", "samples": 8, "noise": 0.2, "seed": 5, "target": 3}
    sg = triton.infer("cnn", [_input("image", images)], parameters=params).as_numpy("attributions/image")
    np.testing.assert_allclose(sg, client.smoothgrad("cnn", images, samples=8, noise=0.2, seed=5, target=3),
                               rtol=1e-5, atol=1e-7)


def test_multi_output_and_jvp_tangents(triton: Any, client: Any) -> None:
    a = np.random.default_rng(5).random((2, 3), dtype=np.float32)
    b = np.random.default_rng(6).random((2, 2), dtype=np.float32)
    result = triton.infer("multi", [_input("a", a), _input("b", b)])
    expected = client.predict("multi", {"a": a, "b": b})
    for name in ("y1", "y2"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-5)
    x = np.random.default_rng(7).random((3, 4), dtype=np.float32)
    v = np.random.default_rng(8).random((3, 4), dtype=np.float32)
    jvp = triton.infer("dense2", [_input("input", x), _input("tangents/input", v)], parameters={"method": "jvp"})
    np.testing.assert_allclose(jvp.as_numpy("attributions/alpha")[:, 0], 0.5 * v.sum(axis=1), rtol=1e-5)


def test_typed_contents_are_read_like_raw(demo_server: Any) -> None:
    # tritonclient always sends raw_input_contents; other clients send typed contents.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = triton_pb2.ModelInferRequest(model_name="dense2", id="typed")
    inp = request.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    inp.contents.fp32_contents.extend(x.reshape(-1).tolist())
    request.parameters["method"].string_param = "gradient"
    with grpc.insecure_channel(demo_server.address) as channel:
        response = triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["attributions/input"]
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], np.float32), 0.5, rtol=1e-5)
    inp.contents.fp32_contents.append(1.0)
    with grpc.insecure_channel(demo_server.address) as channel, pytest.raises(grpc.RpcError) as info:
        triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "inputs['input'].data: 9 values but shape [2, 4] needs 8"


def _native(model: str = "dense2", x: np.ndarray | None = None, **fields: Any) -> pb.ComputeRequest:
    from gradserve import _codec

    request = pb.ComputeRequest(model=model, **fields)
    _codec.encode(np.ones((2, 4), np.float32) if x is None else x, out=request.inputs["input"])
    return request


@pytest.mark.parametrize("case", ["dtype", "shape", "unknown_model", "steps_limit", "target_range", "version"])
def test_errors_are_the_native_ones(triton: Any, demo_server: Any, case: str) -> None:
    x = np.ones((2, 4), np.float32)
    model, inputs, params, native, version = "dense2", [_input("input", x)], {"method": "gradient"}, _native(
        method=pb.METHOD_GRADIENT), ""
    if case == "dtype":
        inputs = [_input("input", x.astype(np.float64), "FP64")]
        native = _native(x=x.astype(np.float64), method=pb.METHOD_GRADIENT)
    elif case == "shape":
        inputs = [_input("input", np.ones((2, 5), np.float32))]
        native = _native(x=np.ones((2, 5), np.float32), method=pb.METHOD_GRADIENT)
    elif case == "unknown_model":
        model, native = "no_such_model", _native("no_such_model", method=pb.METHOD_GRADIENT)
    elif case == "steps_limit":
        params = {"method": "integrated_gradients", "steps": 5000}
        native = _native(method=pb.METHOD_INTEGRATED_GRADIENTS)
        native.integrated_gradients.steps = 5000
    elif case == "target_range":
        params = {"method": "gradient", "target": 3}
        native = _native(method=pb.METHOD_GRADIENT, target=pb.OutputSelector(kind=pb.TARGET_KIND_INDEX, indices=[3]))
    elif case == "version":
        version, native = "7", _native(version=7, method=pb.METHOD_GRADIENT)
    code, message = _native_error(demo_server.address, native)
    assert code != grpc.StatusCode.OK
    assert _oip_error(triton, model, inputs, parameters=params, model_version=version) == (str(code), message)


@pytest.mark.parametrize("params, message", [
    ({"method": "gradient", "steps": "abc"}, "steps: expected an int, got string 'abc'"),
    ({"method": "integrated_gradients", "baseline": "zero"}, "baseline: expected a finite float, got string 'zero'"),
    ({"method": "gradient", "target": "max"}, "target: expected an int or 'argmax', got string 'max'"),
    ({"method": "lime"}, "method: unknown method 'lime'; expected one of ['grad_cam', 'gradient', "
                         "'hvp', 'input_x_gradient', 'integrated_gradients', 'jacobian', 'jvp', 'partial_dependence', "
                         "'predict', 'shap', 'smoothgrad', 'vjp']"),
    ({"method": "integrated_gradients", "quadrature": "simpson"},
     "quadrature: expected one of ['gausslegendre', 'riemann_left', 'riemann_middle', 'riemann_right', "
     "'riemann_trapezoid'], got 'simpson'"),
    ({"methdo": "gradient"}, "parameters: unknown parameter 'methdo'"),
    ({"method": "smoothgrad", "samples": 1 << 40}, "samples: 1099511627776 does not fit in 32 bits"),
])
def test_bad_parameters_are_invalid_argument(triton: Any, params: dict[str, Any], message: str) -> None:
    status, text = _oip_error(triton, "dense2", [_input("input", np.ones((2, 4), np.float32))], parameters=params)
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert text.startswith(message)


def test_unsupported_datatype_and_unknown_output(triton: Any) -> None:
    status, text = _oip_error(triton, "dense2", [_input("input", np.ones((2, 4), np.uint16), "UINT16")])
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert text.startswith("inputs['input'].datatype: 'UINT16' is not supported by gradserve")
    status, text = _oip_error(triton, "dense2", [_input("input", np.ones((2, 4), np.float32))],
                              outputs=[tritonclient_grpc.InferRequestedOutput("attributions/nope")],
                              parameters={"method": "gradient"})
    assert status == "StatusCode.NOT_FOUND" and "'attributions/nope' is not produced" in text


def test_requests_are_counted_by_protocol(triton: Any, demo_server: Any) -> None:
    registry = demo_server.server.metrics.registry
    labels = {"protocol": "oip-grpc", "model": "dense2", "method": "gradient", "code": "OK"}
    before = registry.get_sample_value("gradserve_requests_total", labels) or 0.0
    triton.infer("dense2", [_input("input", np.ones((1, 4), np.float32))], parameters={"method": "gradient"})
    assert registry.get_sample_value("gradserve_requests_total", labels) == before + 1


def test_readme_example_runs(demo_server: Any) -> None:
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Open Inference Protocol (Triton and KServe clients)")[1].split("\n## ")[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(block.replace("127.0.0.1:50051", demo_server.address), "README.md", "exec"), namespace)
    x = namespace["x"]
    np.testing.assert_allclose(namespace["y"][:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    np.testing.assert_allclose(namespace["g"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(namespace["ig"], 0.5 * x, rtol=1e-4, atol=1e-5)
    assert np.abs(namespace["delta"]).max() < 1e-4
    namespace["c"].close()


def test_triton_timeout_parameter_is_the_deadline(triton: Any) -> None:
    inputs = [_input("input", np.ones((1, 4), np.float32))]
    # tritonclient's timeout= is the request parameter "timeout", in microseconds. 1 us: past
    # before the work can start, whatever the machine.
    status, text = _oip_error(triton, "dense2", inputs, parameters={"method": "gradient"}, timeout=1)
    assert status == "StatusCode.DEADLINE_EXCEEDED" and text.startswith("deadline:")
    status, text = _oip_error(triton, "dense2", inputs, timeout=0)
    assert (status, text) == ("StatusCode.INVALID_ARGUMENT", "timeout: 0 is not a positive number of microseconds")
    result = triton.infer("dense2", inputs, parameters={"method": "gradient"}, timeout=60_000_000)
    np.testing.assert_allclose(result.as_numpy("attributions/input"), 0.5, rtol=1e-5)

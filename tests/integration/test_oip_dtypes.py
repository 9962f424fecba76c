"""OIP tensors of every floating width and an integer input, over gRPC and REST (JSON and binary).

The model, built here: y = Σh + Σd + Σb + 1 for inputs h (FP16), d (FP64), b (BF16) and an
INT32 index i whose embedding is 1, so every float input's gradient is 1 in its own dtype and
i has none (it is not differentiable).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http

from subprocess_server import free_port

INPUTS = {"h": ("FP16", np.ones((2, 3), np.float16)), "d": ("FP64", np.full((2, 2), 0.5)),
          "b": ("BF16", np.full((2, 2), 2.0, ml_dtypes.bfloat16)), "i": ("INT32", np.array([[3], [7]], np.int32))}
EXPECTED_Y = 3 * 1.0 + 2 * 0.5 + 2 * 2.0 + 1.0


def _model(path: Path) -> str:
    import keras

    h = keras.Input((3,), dtype="float16", name="h")
    d = keras.Input((2,), dtype="float64", name="d")
    b = keras.Input((2,), dtype="bfloat16", name="b")
    i = keras.Input((1,), dtype="int32", name="i")
    emb = keras.layers.Flatten(name="flat")(keras.layers.Embedding(10, 1, embeddings_initializer="ones", name="emb")(i))
    cat = keras.layers.Concatenate(dtype="float32", name="cat")([h, d, b, emb])
    y = keras.layers.Dense(1, dtype="float32", name="y", kernel_initializer="ones", bias_initializer="zeros")(cat)
    keras.Model({"h": h, "d": d, "b": b, "i": i}, y).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def mixed_server(start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gradserve.server.config import ModelSource, ServerConfig

    path = _model(tmp_path_factory.mktemp("oip-dtypes") / "mixed.keras")
    return start_server(ServerConfig(models=(ModelSource("mixed", path),), http_port=free_port()))


def _inputs(module: Any, binary: bool = True) -> list[Any]:
    out = []
    for name, (datatype, arr) in INPUTS.items():
        inp = module.InferInput(name, list(arr.shape), datatype)
        if module is tritonclient_http:  # tritonclient sends BF16 only as binary data
            inp.set_data_from_numpy(arr, binary_data=binary or datatype == "BF16")
        else:
            inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _check(result: Any) -> None:
    np.testing.assert_allclose(result.as_numpy("y")[:, 0], EXPECTED_Y, rtol=1e-3)
    for name, dtype in (("h", np.float16), ("d", np.float64), ("b", ml_dtypes.bfloat16)):
        grad = result.as_numpy(f"attributions/{name}")
        assert grad.dtype == dtype and grad.shape == INPUTS[name][1].shape, name
        np.testing.assert_allclose(grad.astype(np.float64), 1.0)


def test_metadata_lists_attributions_of_differentiable_inputs(mixed_server: Any) -> None:
    client = tritonclient_grpc.InferenceServerClient(mixed_server.address)
    try:
        meta = client.get_model_metadata("mixed", as_json=True)
    finally:
        client.close()
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {(n, dt) for n, (dt, _) in INPUTS.items()}
    outputs = {t["name"]: t["datatype"] for t in meta["outputs"]}
    assert {k: outputs[k] for k in ("attributions/h", "attributions/d", "attributions/b")} == {
        "attributions/h": "FP16", "attributions/d": "FP64", "attributions/b": "BF16"}
    assert "attributions/i" not in outputs


def test_grpc_raw_tensors_of_every_width(mixed_server: Any) -> None:
    client = tritonclient_grpc.InferenceServerClient(mixed_server.address)
    try:
        names = ["y", "attributions/h", "attributions/d", "attributions/b"]
        result = client.infer("mixed", _inputs(tritonclient_grpc), parameters={"method": "gradient"},
                              outputs=[tritonclient_grpc.InferRequestedOutput(n) for n in names])
    finally:
        client.close()
    _check(result)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rest_tensors_of_every_width(mixed_server: Any, binary: bool) -> None:
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{mixed_server.server.rest.port}")
    try:
        names = ["y", "attributions/h", "attributions/d", "attributions/b"]
        result = client.infer("mixed", _inputs(tritonclient_http, binary), parameters={"method": "gradient"},
                              outputs=[tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in names])
    finally:
        client.close()
    if binary:
        _check(result)
    else:  # JSON has no 16-bit floats: FP16 and BF16 come back as numbers, read here as such
        doc = {o["name"]: o for o in result.get_response()["outputs"]}
        np.testing.assert_allclose(doc["y"]["data"], EXPECTED_Y, rtol=1e-3)
        for name, datatype in (("h", "FP16"), ("d", "FP64"), ("b", "BF16")):
            assert doc[f"attributions/{name}"]["datatype"] == datatype
            np.testing.assert_allclose(doc[f"attributions/{name}"]["data"], 1.0)

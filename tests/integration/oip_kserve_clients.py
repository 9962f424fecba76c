"""KServe's own clients against gradserve's OIP front-ends, with the server in the same process.

Run by test_oip_kserve.py in a fresh interpreter: kserve and tritonclient.grpc both register
``inference.*`` messages in protobuf's default pool and cannot be imported into one process
(a duplicate symbol error between the two of them), while each of them can live beside
gradserve's server, whose OIP classes are in a private pool. Exits 0 when every check passes.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: subprocess_server

import grpc
import httpx
import kserve  # imported before the server: its messages go in the default pool first
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

import gradserve
from gradserve.server.config import ServerConfig
from gradserve.server.process.app import BackgroundServer
from subprocess_server import free_port


def _request(model: str, name: str, x: np.ndarray, binary: bool, **parameters: object) -> InferRequest:
    inp = InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model, [inp], request_id="kserve-1", parameters=parameters or None)


def _outputs(response: kserve.InferResponse) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in response.outputs}


async def check(grpc_address: str, base_url: str, expected_ig: np.ndarray, images: np.ndarray) -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    closed_form = 0.5 * x.sum(axis=1) + 0.1

    client = InferenceGRPCClient(grpc_address)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("dense2") and not await client.is_model_ready("no_such_model")
        out = _outputs(await client.infer(_request("dense2", "input", x, True)))
        np.testing.assert_allclose(out["alpha"][:, 0], closed_form, rtol=1e-5)
        out = _outputs(await client.infer(_request("dense2", "input", x, True, method="gradient")))
        np.testing.assert_allclose(out["attributions/input"], 0.5, rtol=1e-5)
        out = _outputs(await client.infer(_request("cnn", "image", images, True, method="integrated_gradients",
                                                   target="argmax", steps=16)))
        np.testing.assert_allclose(out["attributions/image"], expected_ig, rtol=1e-5, atol=1e-7)
        try:
            await client.infer(_request("dense2", "input", x, True, method="gradient", steps="abc"))
            raise AssertionError("a bad parameter was accepted")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert exc.details() == "steps: expected an int, got string 'abc'", exc.details()
    finally:
        await client.close()

    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        assert await rest.is_server_live(base_url) and await rest.is_server_ready(base_url)
        assert await rest.is_model_ready(base_url, "dense2")
        for binary in (False, True):
            response = await rest.infer(base_url, _request("dense2", "input", x, binary, method="gradient"),
                                        model_name="dense2")
            np.testing.assert_allclose(_outputs(response)["attributions/input"], 0.5, rtol=1e-5)
        response = await rest.infer(base_url, _request("dense2", "input", x, False), model_name="dense2")
        np.testing.assert_allclose(_outputs(response)["alpha"][:, 0], closed_form, rtol=1e-5)
        response = await rest.infer(base_url, _request("cnn", "image", images, False, method="integrated_gradients",
                                                       target="argmax", steps=16), model_name="cnn")
        np.testing.assert_allclose(_outputs(response)["attributions/image"], expected_ig, rtol=1e-5, atol=1e-7)
        try:
            await rest.infer(base_url, _request("no_such_model", "input", x, False), model_name="no_such_model")
            raise AssertionError("an unknown model was served")
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 404, exc
            assert exc.response.json()["error"].startswith("model: unknown model 'no_such_model'")
    finally:
        await rest.close()


def main() -> int:
    config = ServerConfig(demo_models=True, host="127.0.0.1", port=0, http_port=free_port())
    with BackgroundServer(config) as server:
        images = np.random.default_rng(1).random((2, 16, 16, 1), dtype=np.float32)
        with gradserve.Client(server.address) as sdk:
            expected = sdk.integrated_gradients("cnn", images, target="argmax", steps=16)
        assert server.server is not None and server.server.rest is not None
        asyncio.run(check(server.address, f"http://127.0.0.1:{server.server.rest.port}", expected, images))
    print("kserve clients: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

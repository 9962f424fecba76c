"""The Open Inference Protocol over HTTP/REST (``--http-port``), behind a bearer token.

tritonclient.http (binary tensors by default, and JSON), plain JSON through httpx as curl would
send it, and the OIP gRPC service of the same server for the token check. Values are checked
against closed forms (dense2: output 0.5·Σx + 0.1, gradient 0.5) or the native SDK's answer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
import tritonclient.http as tritonclient_http
from tritonclient.utils import InferenceServerException

from subprocess_server import free_port

TOKEN = "oip-test-token"
#: Passed as dict(AUTH): tritonclient.http adds its own headers to the dict it is given.
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The server's message (and REST body) limit, small enough to test at its edge.
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def rest_server(start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gradserve.server.config import Limits, ServerConfig

    tokens = tmp_path_factory.mktemp("oip") / "tokens"
    tokens.write_text(f"# accepted\n{TOKEN}\n")
    return start_server(ServerConfig(demo_models=True, http_port=free_port(), auth_token_file=str(tokens),
                                     limits=Limits(max_message_bytes=LIMIT)))


@pytest.fixture(scope="module")
def base_url(rest_server: Any) -> str:
    return f"http://127.0.0.1:{rest_server.server.rest.port}"


@pytest.fixture(scope="module")
def triton(rest_server: Any) -> Iterator[Any]:
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{rest_server.server.rest.port}")
    yield client
    client.close()


@pytest.fixture()
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def _input(name: str, array: np.ndarray, binary: bool = True) -> Any:
    inp = tritonclient_http.InferInput(name, list(array.shape), "FP32")
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def test_health_is_open_and_the_rest_needs_the_token(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 200
    for method, path in (("GET", "/v2"), ("GET", "/v2/models/dense2"), ("GET", "/v2/models/dense2/ready"),
                         ("POST", "/v2/models/dense2/infer")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = http.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (path, headers)
            assert "Bearer" in response.json()["error"]
    assert http.get("/v2", headers=AUTH).json()["name"] == "gradserve"


def test_grpc_service_needs_the_token_but_probes_do_not(rest_server: Any) -> None:
    client = tritonclient_grpc.InferenceServerClient(rest_server.address)
    try:
        assert client.is_server_live() and client.is_server_ready()
        inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("dense2", [inp])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer("dense2", [inp], headers={"authorization": f"Bearer {TOKEN}"})
        np.testing.assert_allclose(result.as_numpy("alpha"), [[2.1]], rtol=1e-5)
    finally:
        client.close()


def test_tritonclient_metadata_and_readiness(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready(headers=dict(AUTH))
    assert triton.is_model_ready("dense2", headers=dict(AUTH))
    assert not triton.is_model_ready("no_such_model", headers=dict(AUTH))
    meta = triton.get_model_metadata("cnn", headers=dict(AUTH))
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 16, 16, 1]}]
    assert {"probs", "attributions/image", "target_indices"} <= {o["name"] for o in meta["outputs"]}
    assert triton.get_model_metadata("dense2", "1", headers=dict(AUTH))["versions"] == ["1"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_predict_and_gradient(triton: Any, binary: bool) -> None:
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("attributions/input", "alpha")]
    result = triton.infer("dense2", [_input("input", x, binary)], outputs=outputs, headers=dict(AUTH),
                          parameters={"method": "gradient"}, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("attributions/input"), 0.5, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("alpha")[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    response = result.get_response()
    assert response["id"] == "r1"
    assert all(("data" in o) != binary for o in response["outputs"])
    predicted = triton.infer("dense2", [_input("input", x, binary)], headers=dict(AUTH), model_version="1")
    np.testing.assert_allclose(predicted.as_numpy("alpha")[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)


def test_tritonclient_integrated_gradients_match_the_sdk(triton: Any, rest_server: Any) -> None:
    import gradserve

    images = np.random.default_rng(1).random((2, 16, 16, 1), dtype=np.float32)
    inp = tritonclient_http.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = triton.infer("cnn", [inp], headers=dict(AUTH),
                          parameters={"method": "integrated_gradients", "target": "argmax", "steps": 16})
    with gradserve.Client(rest_server.address, token=TOKEN) as sdk:
        expected = sdk.integrated_gradients("cnn", images, target="argmax", steps=16)
    np.testing.assert_allclose(result.as_numpy("attributions/image"), expected, rtol=1e-5, atol=1e-7)


def test_plain_json_as_curl_sends_it(http: httpx.Client) -> None:
    body = {"id": "curl-1", "parameters": {"method": "gradient"},
            "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                        "data": [[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]]}],
            "outputs": [{"name": "alpha"}, {"name": "attributions/input"}]}
    response = http.post("/v2/models/dense2/infer", content=json.dumps(body),
                         headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["id"] == "curl-1" and doc["model_name"] == "dense2" and doc["model_version"] == "1"
    alpha, grads = doc["outputs"]
    assert alpha["name"] == "alpha" and alpha["shape"] == [2, 1] and alpha["datatype"] == "FP32"
    np.testing.assert_allclose(alpha["data"], [5.1, 1.1], rtol=1e-5)
    assert grads["shape"] == [2, 4] and np.allclose(grads["data"], 0.5)
    versioned = http.post("/v2/models/dense2/versions/1/infer", json=body, headers=AUTH)
    assert versioned.json()["outputs"] == doc["outputs"]


@pytest.mark.parametrize("path, body, status, error", [
    ("/v2/models/no_such_model/infer", {"inputs": []}, 404, "model: unknown model 'no_such_model'"),
    ("/v2/models/dense2/infer", {"parameters": {"method": "gradient", "steps": "abc"}}, 400,
     "steps: expected an int, got string 'abc'"),
    ("/v2/models/dense2/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64",
                                             "data": [1, 2, 3, 4]}]}, 400,
     "inputs['input'].dtype: got float64, the model expects float32"),
    ("/v2/models/dense2/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                             "data": [1, 2, 3]}]}, 400,
     "inputs['input'].data: 3 values but shape [1, 4] needs 4"),
    ("/v2/models/dense2/infer", "[1, 2", 400, "request: the body is not valid JSON"),
    ("/v2/models/dense2/infer", {"parameters": {"method": "smoothgrad", "noise": 10 ** 400}}, 400,
     "noise: expected a finite float, got int 1000"),
    ("/v2/models/dense2/infer", {"parameters": {"method": "smoothgrad", "noise": float("nan")}}, 400,
     "noise: expected a finite float, got float nan"),
    ("/v2/models/dense2/versions/x1/infer", {"inputs": []}, 400, "model_version: 'x1' is not a version number"),
    ("/v2/models/dense2/versions/7", None, 404, "version: model 'dense2' has no version 7"),
    ("/v2/models/no_such_model", None, 404, "name: unknown model 'no_such_model'"),  # as native GetModel
])
def test_errors_are_http_status_and_json(http: httpx.Client, path: str, body: Any, status: int,
                                         error: str) -> None:
    if body is None:
        response = http.get(path, headers=AUTH)
    else:
        content = body if isinstance(body, str) else json.dumps(body)
        response = http.post(path, content=content, headers=AUTH)
    assert response.status_code == status, response.text
    assert response.json()["error"].startswith(error)


def test_body_limit_edge(http: httpx.Client) -> None:
    at_limit = b" " * (LIMIT - 2) + b"{}"   # valid JSON of exactly LIMIT bytes: read, then refused as empty
    response = http.post("/v2/models/dense2/infer", content=at_limit, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"].startswith("inputs: missing input 'input'")
    response = http.post("/v2/models/dense2/infer", content=at_limit + b" ", headers=AUTH)
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]


def test_binary_body_checks(http: httpx.Client) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}],
                         "parameters": {"binary_data_output": True}}).encode()
    headers = {**AUTH, "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    response = http.post("/v2/models/dense2/infer", content=header + x.tobytes(), headers=headers)
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    doc = json.loads(response.content[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 4}
    np.testing.assert_allclose(np.frombuffer(response.content[length:], np.float32), [3.1], rtol=1e-5)
    short = http.post("/v2/models/dense2/infer", content=header + x.tobytes()[:12], headers=headers)
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    extra = http.post("/v2/models/dense2/infer", content=header + x.tobytes() + b"\0", headers=headers)
    assert extra.status_code == 400 and "not claimed by any input" in extra.json()["error"]


def test_requests_are_counted_by_protocol(http: httpx.Client, rest_server: Any) -> None:
    registry = rest_server.server.metrics.registry
    labels = {"protocol": "oip-rest", "model": "dense2", "method": "predict", "code": "INVALID_ARGUMENT"}
    before = registry.get_sample_value("gradserve_requests_total", labels) or 0.0
    http.post("/v2/models/dense2/infer", json={"inputs": []}, headers=AUTH)
    assert registry.get_sample_value("gradserve_requests_total", labels) == before + 1


def test_cli_flag(tmp_path: Path) -> None:
    from gradserve.server.process.cli import build_parser

    assert build_parser().parse_args(["serve"]).http_port == 0
    assert build_parser().parse_args(["serve", "--http-port", "8000"]).http_port == 8000


def _self_signed(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own trust root) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_rest_is_https_when_the_grpc_port_has_tls(start_server: Callable[..., Any],
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    import ssl

    from gradserve.server.config import ServerConfig

    cert, key = _self_signed(tmp_path_factory.mktemp("oip-tls"))
    server = start_server(ServerConfig(demo_models=True, http_port=free_port(), tls_cert=cert, tls_key=key))
    https = f"https://127.0.0.1:{server.server.rest.port}"
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=60) as c:
        assert c.get(f"{https}/v2/health/live").json() == {"live": True}
        np.testing.assert_allclose(c.post(f"{https}/v2/models/dense2/infer", json=body).json()["outputs"][0]["data"],
                                   [5.1], rtol=1e-5)
    with httpx.Client(timeout=60) as c, pytest.raises(httpx.HTTPError):
        c.get(f"http://127.0.0.1:{server.server.rest.port}/v2/health/live")


def test_unavailable_is_503_and_a_full_queue_is_429(start_server: Callable[..., Any], tmp_path: Path) -> None:
    from gradserve.server.config import BatchingConfig, ModelSource, ServerConfig

    # "broken" fails to load; dense2's queue holds nothing, so every request finds it full.
    broken = ModelSource("broken", str(tmp_path / "missing.keras"))
    server = start_server(ServerConfig(demo_models=True, models=(broken,), http_port=free_port(),
                                       model_batching={"dense2": BatchingConfig(max_queue=0)}))
    with httpx.Client(base_url=f"http://127.0.0.1:{server.server.rest.port}", timeout=60) as c:
        assert c.get("/v2/models/broken/ready").status_code == 503
        response = c.post("/v2/models/broken/infer", json={"inputs": []})
        assert response.status_code == 503 and response.json()["error"].startswith("model: 'broken' has no READY")
        assert c.get("/v2/models/broken").status_code == 503
        body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        response = c.post("/v2/models/dense2/infer", json=body)
        assert response.status_code == 429 and response.json()["error"].startswith("queue: model queue is full")
    client = tritonclient_grpc.InferenceServerClient(server.address)
    try:
        inp = tritonclient_grpc.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("dense2", [inp])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        client.close()

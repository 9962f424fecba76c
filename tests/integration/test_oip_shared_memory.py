"""Triton's system shared-memory extension over gRPC and REST, driven by tritonclient's own
``tritonclient.utils.shared_memory`` helpers on the demo models, behind a bearer token.

Values are checked against closed forms (dense2: output 0.5·Σx + 0.1, gradient 0.5) or against
the same request sent with its tensors in the message; refusals against their status and
message; the limits on regions and bytes at their edges; a region unregistered while an
inference uses it.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import secrets
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.utils import InferenceServerException

from gated_model import MARK, Gate
from subprocess_server import free_port

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm (Linux)")

TOKEN = "shm-test-token"
#: The server's limits on regions and bytes mapped, small enough to test at their edges.
REGIONS = 4
BYTES = 1 << 20
PROTOCOLS = ["grpc", "http"]


class _Token(InferenceServerClientPlugin):
    """tritonclient's hook for headers on every call: the bearer token."""

    def __call__(self, request: Any) -> None:
        request.headers["authorization"] = f"Bearer {TOKEN}"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from gradserve.server.config import BatchingConfig, EngineConfig, Limits, ServerConfig
    from gradserve.server.models import demo

    tokens = tmp_path_factory.mktemp("shm") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    gate = Gate()
    srv = start_server(ServerConfig(http_port=free_port(), auth_token_file=str(tokens), compute_threads=3,
                                    limits=Limits(max_shm_regions=REGIONS, max_shm_bytes=BYTES),
                                    model_batching={"gate": BatchingConfig(enabled=False)},
                                    engine=EngineConfig(xla="off")),
                       models={"dense2": demo.build_dense2, "cnn": demo.build_cnn, "multi": demo.build_multi,
                               "gate": gate.model})
    srv.gate = gate
    yield srv
    gate.release.set()


@pytest.fixture(scope="module", params=PROTOCOLS)
def triton(request: pytest.FixtureRequest, server: Any) -> Iterator[Any]:
    """(tritonclient module, client with the token) of each protocol."""
    if request.param == "grpc":
        module: Any = tgrpc
        client = tgrpc.InferenceServerClient(server.address)
    else:
        module = thttp
        client = thttp.InferenceServerClient(f"127.0.0.1:{server.server.rest.port}")
    client.register_plugin(_Token())
    yield module, client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture()
def region(triton: tuple[Any, Any], server: Any) -> Iterator[Callable[..., Any]]:
    """Factory: ``region(byte_size, register=True)`` -> (name, key, handle) of a fresh POSIX region
    made by tritonclient's helpers (and registered); all unregistered and destroyed afterwards."""
    made: list[Any] = []
    _, client = triton

    def make(byte_size: int, register: bool = True) -> tuple[str, str, Any]:
        name = f"r{secrets.token_hex(4)}"
        key = f"/gs-test-{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        if register:
            client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    yield make
    client.unregister_system_shared_memory()
    for handle in made:
        shm.destroy_shared_memory_region(handle)
    _wait_for(lambda: server.server.shared_memory.regions == 0, lambda: "regions are still mapped")


def _wait_for(what: Callable[[], bool], message: Callable[[], str]) -> None:
    """Wait for a state of the server (polled; not a timing check)."""
    end = time.monotonic() + 120
    while not what():
        assert time.monotonic() < end, message()
        time.sleep(0.01)


def _shared_input(module: Any, name: str, x: np.ndarray, region: str, offset: int = 0) -> Any:
    inp = module.InferInput(name, list(x.shape), "FP32")
    inp.set_shared_memory(region, x.nbytes, offset=offset)
    return inp


def _shared_output(module: Any, name: str, region: str, byte_size: int, offset: int = 0) -> Any:
    out = module.InferRequestedOutput(name)
    out.set_shared_memory(region, byte_size, offset=offset)
    return out


def _refused(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def test_dense2_reads_and_writes_the_regions(triton: tuple[Any, Any], region: Callable[..., Any]) -> None:
    module, client = triton
    x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
    name, _, handle = region(3 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    inp = _shared_input(module, "input", x, name)
    # The gradient into the region after the input; the outputs of the same pass into the one after.
    result = client.infer("dense2", [inp], parameters={"method": "gradient"},
                          outputs=[_shared_output(module, "attributions/input", name, x.nbytes, x.nbytes),
                                   _shared_output(module, "alpha", name, 32, 2 * x.nbytes)])
    np.testing.assert_allclose(shm.get_contents_as_numpy(handle, np.float32, x.shape, offset=x.nbytes), 0.5,
                               rtol=1e-5)
    np.testing.assert_allclose(shm.get_contents_as_numpy(handle, np.float32, (8, 1), offset=2 * x.nbytes)[:, 0],
                               0.5 * x.sum(axis=1) + 0.1, rtol=1e-5)
    # The answer names them with their shapes, but holds no data.
    out = result.get_output("attributions/input")
    shape = out["shape"] if isinstance(out, dict) else list(out.shape)
    assert shape == [8, 4]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, x.shape), x)  # input untouched


def test_regions_mix_with_tensors_in_the_message(triton: tuple[Any, Any], region: Callable[..., Any]) -> None:
    """An input in the message and one in a region (gRPC: raw_input_contents holds only the first),
    an output in a region and one in the answer."""
    module, client = triton
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 3), dtype=np.float32), rng.random((3, 2), dtype=np.float32)
    name, _, handle = region(256)
    shm.set_shared_memory_region(handle, [b])
    a_in = module.InferInput("a", [3, 3], "FP32")
    a_in.set_data_from_numpy(a)
    expected = client.infer("multi", [a_in, _input(module, "b", b)], parameters={"method": "gradient"})
    result = client.infer("multi", [a_in, _shared_input(module, "b", b, name)], parameters={"method": "gradient"},
                          outputs=[module.InferRequestedOutput("attributions/a"),
                                   _shared_output(module, "attributions/b", name, b.nbytes, 128)])
    np.testing.assert_array_equal(result.as_numpy("attributions/a"), expected.as_numpy("attributions/a"))
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, (3, 2), offset=128),
                                  expected.as_numpy("attributions/b"))


def _input(module: Any, name: str, x: np.ndarray) -> Any:
    inp = module.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


@pytest.mark.parametrize("method", ["predict", "gradient", "integrated_gradients"])
def test_cnn_answers_as_over_the_socket(triton: tuple[Any, Any], region: Callable[..., Any], method: str) -> None:
    module, client = triton
    images = np.random.default_rng(2).random((3, 16, 16, 1), dtype=np.float32)
    params = {"method": method, "target": 1} if method != "predict" else {"method": method}
    output = "attributions/image" if method != "predict" else "probs"
    expected = client.infer("cnn", [_input(module, "image", images)], parameters=params,
                            outputs=[module.InferRequestedOutput(output)]).as_numpy(output)
    name, _, handle = region(2 * images.nbytes)
    shm.set_shared_memory_region(handle, [images])
    client.infer("cnn", [_shared_input(module, "image", images, name)], parameters=params,
                 outputs=[_shared_output(module, output, name, expected.nbytes, images.nbytes)])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, expected.shape, offset=images.nbytes),
                                  expected)


def test_status_and_unregister(triton: tuple[Any, Any], region: Callable[..., Any], server: Any) -> None:
    module, client = triton
    first, key, _ = region(4096)
    second, _, _ = region(8192)

    def status(name: str = "") -> dict[str, dict[str, Any]]:
        answer = client.get_system_shared_memory_status(name, **({"as_json": True} if module is tgrpc else {}))
        entries = answer.get("regions", {}).values() if module is tgrpc else answer   # (JSON drops an empty map)
        return {e["name"]: {k: int(v) if k in ("offset", "byte_size") else v for k, v in e.items()} for e in entries}

    everything = status()
    assert everything[first] == {"name": first, "key": key, "byte_size": 4096} | (
        {"offset": 0} if module is thttp else {})   # gRPC's JSON leaves the zero offset out
    assert set(everything) == {first, second} and list(status(second)) == [second]
    assert server.server.metrics.registry.get_sample_value("gradserve_shm_regions") == 2
    assert server.server.metrics.registry.get_sample_value("gradserve_shm_bytes_mapped") == 4096 + 8192
    client.unregister_system_shared_memory(first)
    assert set(status()) == {second}
    status_code, message = _refused(lambda: status(first))
    assert status_code in ("StatusCode.NOT_FOUND", "404")
    assert f"no system shared-memory region named '{first}'" in message
    client.unregister_system_shared_memory()
    assert status() == {}
    assert server.server.metrics.registry.get_sample_value("gradserve_shm_bytes_mapped") == 0


def _codes(module: Any, code: str, http: int) -> str:
    return f"StatusCode.{code}" if module is tgrpc else str(http)


def test_registration_refusals(triton: tuple[Any, Any], region: Callable[..., Any]) -> None:
    module, client = triton
    name, key, _ = region(4096)
    _, spare_key, _ = region(4096, register=False)
    cases = [
        (("x", "no-slash", 8), "INVALID_ARGUMENT", 400, "key: 'no-slash' is not a POSIX shared-memory name"),
        (("x", "/dev/shm/x", 8), "INVALID_ARGUMENT", 400, "is not a POSIX shared-memory name"),
        (("x", "/..", 8), "INVALID_ARGUMENT", 400, "is not a POSIX shared-memory name"),
        (("x", "/gradserve-1-ab", 8), "INVALID_ARGUMENT", 400, "gradserve SDK segment"),
        (("x", "/gs-test-no-such-key", 8), "NOT_FOUND", 404, "no shared-memory object '/gs-test-no-such-key'"),
        ((name, spare_key, 8), "ALREADY_EXISTS", 409, f"'{name}' is already registered"),
        (("x", spare_key, 4097), "INVALID_ARGUMENT", 400, "byte size 4097 is past the end of the object"),
        (("x", spare_key, 100, 4000), "INVALID_ARGUMENT", 400, r"offset 4000 + byte size 100 is past the end"),
    ]
    for args, code, http, fragment in cases:
        status, message = _refused(lambda args=args: client.register_system_shared_memory(*args))
        assert status == _codes(module, code, http), (args, status, message)
        assert fragment in message, (args, message)
    # Nothing of them stays registered.
    if module is tgrpc:
        assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {name}
    else:
        assert [e["name"] for e in client.get_system_shared_memory_status()] == [name]


def test_inference_refusals(triton: tuple[Any, Any], region: Callable[..., Any]) -> None:
    module, client = triton
    x = np.ones((2, 4), np.float32)
    name, _, handle = region(64)
    shm.set_shared_memory_region(handle, [x])
    gradient = {"method": "gradient"}
    cases = [
        (lambda: client.infer("dense2", [_shared_input(module, "input", x, "nope")]), "NOT_FOUND", 404,
         "inputs['input'].parameters.shared_memory: no system shared-memory region named 'nope'"),
        (lambda: client.infer("dense2", [_size(module, name, 28)]), "INVALID_ARGUMENT", 400,
         "shared_memory.byte_size: 28 bytes, but shape [2, 4] of float32 needs 32"),
        (lambda: client.infer("dense2", [_shared_input(module, "input", x, name, offset=40)]), "INVALID_ARGUMENT",
         400, "offset 40 + byte size 32 is past the end of region"),
        (lambda: client.infer("dense2", [_shared_input(module, "input", x, name)], parameters=gradient,
                              outputs=[_shared_output(module, "attributions/input", name, 31, 32)]),
         "INVALID_ARGUMENT", 400, "shared_memory_byte_size: 31 bytes, but the output (shape [2, 4]) needs 32"),
        (lambda: client.infer("dense2", [_shared_input(module, "input", x, name)],
                              outputs=[_shared_output(module, "alpha", "nope", 8)]), "NOT_FOUND", 404,
         "no system shared-memory region named 'nope'"),
    ]
    for call, code, http, fragment in cases:
        status, message = _refused(call)
        assert status == _codes(module, code, http), (status, message)
        assert fragment in message, message
    # A refused output wrote nothing: the region still holds the input.
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, (2, 4)), x)


def _size(module: Any, region: str, byte_size: int) -> Any:
    inp = module.InferInput("input", [2, 4], "FP32")
    inp.set_shared_memory(region, byte_size)
    return inp


def test_malformed_parameters_over_rest(server: Any, region: Callable[..., Any]) -> None:
    """What tritonclient never sends: data beside a region, a region without its byte size."""
    name, _, _ = region(64)
    url = f"http://127.0.0.1:{server.server.rest.port}/v2/models/dense2/infer"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    shared = {"shared_memory_region": name, "shared_memory_byte_size": 32}
    cases = [
        ({"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8, "parameters": shared},
         "has data although it is in shared memory"),
        ({"name": "input", "shape": [2, 4], "datatype": "FP32", "parameters": {"shared_memory_region": name}},
         "shared_memory_region and shared_memory_byte_size go together"),
        ({"name": "input", "shape": [2, 4], "datatype": "FP32",
          "parameters": {**shared, "shared_memory_offset": -8}}, "shared_memory_offset: expected a byte count"),
    ]
    for tensor, fragment in cases:
        answer = httpx.post(url, json={"inputs": [tensor]}, headers=headers, timeout=60)
        assert answer.status_code == 400 and fragment in answer.json()["error"], answer.text
    answer = httpx.post(url, headers=headers, timeout=60, json={
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "parameters": shared}],
        "outputs": [{"name": "alpha", "parameters": {**shared, "binary_data": True}}]})
    assert answer.status_code == 400 and "binary_data and shared_memory_region exclude" in answer.json()["error"]


def test_limits_at_their_edges(triton: tuple[Any, Any], region: Callable[..., Any]) -> None:
    module, client = triton
    names = [region(4096)[0] for _ in range(REGIONS)]   # exactly the limit
    status, message = _refused(lambda: region(4096))
    assert status == _codes(module, "RESOURCE_EXHAUSTED", 429) and f"--max-shm-regions {REGIONS}" in message
    for name in names:
        client.unregister_system_shared_memory(name)
    region(BYTES - 4096)
    region(4096)   # exactly the byte limit
    client.unregister_system_shared_memory()
    region(BYTES)
    status, message = _refused(lambda: region(1))
    assert status == _codes(module, "RESOURCE_EXHAUSTED", 429)
    assert f"mapping 1 more bytes would exceed the server's limit of {BYTES}" in message


def test_registration_needs_the_token(server: Any, region: Callable[..., Any]) -> None:
    name, key, _ = region(4096, register=False)
    anonymous = tgrpc.InferenceServerClient(server.address)
    try:
        for call in (lambda: anonymous.register_system_shared_memory(name, key, 4096),
                     anonymous.get_system_shared_memory_status, anonymous.unregister_system_shared_memory):
            assert _refused(call)[0] == "StatusCode.UNAUTHENTICATED"
    finally:
        anonymous.close()
    base = f"http://127.0.0.1:{server.server.rest.port}/v2/systemsharedmemory"
    for method, path in (("POST", f"/region/{name}/register"), ("GET", "/status"), ("POST", "/unregister")):
        answer = httpx.request(method, base + path, json={"key": key, "offset": 0, "byte_size": 4096}, timeout=60)
        assert answer.status_code == 401, answer.text
    assert server.server.shared_memory.regions == 0


def test_unregistered_while_an_inference_uses_it(server: Any, region: Callable[..., Any],
                                                 triton: tuple[Any, Any]) -> None:
    """The inference finishes and writes its answer; new ones do not find the region; it is unmapped
    once the inference is done."""
    module, client = triton
    x = np.ones((1, 4), np.float32)
    x[0, 0] = MARK   # held in the gate model until released
    name, _, handle = region(2 * x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    registry, gate = server.server.shared_memory, server.gate
    gate.release.clear()
    errors: list[BaseException] = []

    def held() -> None:
        # tritonclient.http's client is gevent's: one per thread.
        own = client if module is tgrpc else thttp.InferenceServerClient(f"127.0.0.1:{server.server.rest.port}",
                                                                          network_timeout=300)
        try:
            if own is not client:
                own.register_plugin(_Token())
            own.infer("gate", [_shared_input(module, "x", x, name)],
                      outputs=[_shared_output(module, "y", name, x.nbytes, x.nbytes)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if own is not client:
                own.close()

    worker = threading.Thread(target=held)
    worker.start()
    try:
        _wait_for(lambda: server.server.admission.calls == 1 or bool(errors),
                  lambda: f"the inference did not reach the model ({server.server.admission.calls} calls)")
        assert not errors, errors
        client.unregister_system_shared_memory(name)
        status, message = _refused(lambda: client.infer("gate", [_shared_input(module, "x", np.ones((1, 4),
                                                                                 np.float32), name)]))
        assert status == _codes(module, "NOT_FOUND", 404) and "no system shared-memory region named" in message
        assert registry.regions == 1   # still mapped for the inference in flight
    finally:
        gate.release.set()
        worker.join(120)
    assert not errors, errors
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, (1, 4), offset=x.nbytes), x)
    _wait_for(lambda: registry.regions == 0, lambda: f"{registry.regions} regions still mapped")


def test_server_metadata_names_the_extension(triton: tuple[Any, Any]) -> None:
    module, client = triton
    meta = client.get_server_metadata(**({"as_json": True} if module is tgrpc else {}))
    assert "system_shared_memory" in meta["extensions"]


def test_off_is_unimplemented(start_server: Callable[..., Any]) -> None:
    from gradserve.server.config import ServerConfig

    srv = start_server(ServerConfig(demo_models=True, http_port=free_port(), shared_memory=False))
    key = f"/gs-test-off-{secrets.token_hex(4)}"
    handle = shm.create_shared_memory_region("off", key, 64)
    try:
        for module, address in ((tgrpc, srv.address), (thttp, f"127.0.0.1:{srv.server.rest.port}")):
            with module.InferenceServerClient(address) as client:
                meta = client.get_server_metadata(**({"as_json": True} if module is tgrpc else {}))
                assert "system_shared_memory" not in meta["extensions"]
                status, message = _refused(lambda c=client: c.register_system_shared_memory("off", key, 64))
                assert status in ("StatusCode.UNIMPLEMENTED", "501")
                assert "shared memory is off on this server" in message and "--shared-memory on" in message
                status, _ = _refused(lambda c=client, m=module: c.infer("dense2", [_size(m, "off", 32)]))
                assert status in ("StatusCode.UNIMPLEMENTED", "501")
    finally:
        shm.destroy_shared_memory_region(handle)


def test_the_default_follows_the_address() -> None:
    from gradserve.server.config import ServerConfig

    assert ServerConfig(host="127.0.0.1").shared_memory_enabled and ServerConfig(host="::1").shared_memory_enabled
    assert ServerConfig(host="localhost").shared_memory_enabled and ServerConfig(host="127.0.0.2").shared_memory_enabled
    assert not ServerConfig(host="0.0.0.0").shared_memory_enabled
    assert not ServerConfig(host="10.1.2.3").shared_memory_enabled
    assert not ServerConfig(host="example.com").shared_memory_enabled
    assert ServerConfig(host="0.0.0.0", shared_memory=True).shared_memory_enabled
    assert not ServerConfig(host="127.0.0.1", shared_memory=False).shared_memory_enabled


@pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed")
def test_kserve_grpc_client_writes_outputs_into_a_region() -> None:
    # A fresh interpreter: kserve and tritonclient.grpc cannot be imported into one process.
    script = pathlib.Path(__file__).with_name("oip_kserve_shared_memory.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280,
                          cwd=script.parents[1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout

"""Model repository through a real server: model dir layout, versions, hot reload with drain,
safe loading, SavedModels, multi-input/output and integer inputs, no retracing after warm-up."""
from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any, Callable

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradserve
from gradserve.server.config import EngineConfig, ModelSource, ServerConfig

MAX_BUCKET = 8


def _linear(k: float) -> Any:
    """y = k·Σx over 4 inputs: the gradient is k everywhere, so it tells the version apart."""
    inputs = keras.Input((4,), name="x")
    out = keras.layers.Dense(1, use_bias=False, name="y", kernel_initializer=keras.initializers.Constant(k))(inputs)
    return keras.Model(inputs, out)


def _save(model: Any, folder: str, file: str = "model.keras") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file)
    model.save(path)
    return path


class _Analytic(tf.Module):
    """y = 5·x0 + x1² + sin x2, for inputs of shape (None, 3)."""

    @tf.function(input_signature=[tf.TensorSpec((None, 3), tf.float32, name="x")])
    def serve(self, x):
        return {"y": 5.0 * x[:, 0] + x[:, 1] ** 2 + tf.sin(x[:, 2])}


def _int_input_model() -> Any:
    keras.utils.set_random_seed(4)
    tok = keras.Input((3,), dtype="int32", name="tok")
    cont = keras.Input((2,), name="cont")
    emb = keras.layers.Flatten()(keras.layers.Embedding(5, 2, name="emb")(tok))
    out = keras.layers.Dense(1, name="y")(keras.layers.Concatenate()([emb, cont]))
    return keras.Model([tok, cont], out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("models")
    staging = tmp_path_factory.mktemp("staging")
    _save(_linear(1.0), str(root / "lin" / "1"))
    _save(_linear(2.0), str(root / "lin" / "2"))
    _save(_linear(7.0), str(root), "top.keras")  # DIR/<name>.keras serves as version 1
    module = _Analytic()
    tf.saved_model.save(module, str(root / "sm" / "1"), signatures={"serving_default": module.serve})
    emb = _int_input_model()
    _save(emb, str(root / "emb" / "1"))
    inputs = keras.Input((4,), name="x")
    lam = _save(keras.Model(inputs, keras.layers.Lambda(lambda t: 3.0 * t)(inputs)), str(root / "lam" / "1"))
    old = _save(_linear(4.0), str(root / "old" / "1"), "model.h5")
    _save(_linear(3.0), str(staging / "lin3"))
    return {"root": str(root), "lin3": str(staging / "lin3"), "lam": lam, "old": old, "emb": emb}


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], model_dir: dict[str, Any]) -> Any:
    return start_server(ServerConfig(model_dir=model_dir["root"], poll_seconds=0.2,
                                     engine=EngineConfig(max_bucket=MAX_BUCKET, xla="auto")))


@pytest.fixture()
def client(server: Any):
    with gradserve.Client(server.address, timeout=60) as c:
        yield c


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Wait for a state change (the poll thread works in the background); not a timing check."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _states(client: Any, name: str) -> dict[int, str]:
    return {v.version: v.state for v in client.model_info(name, refresh=True).versions}


X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def test_versions_side_by_side_and_version_zero_is_the_highest_ready(client):
    for version, k in ((1, 1.0), (2, 2.0), (0, 2.0)):
        result = client.compute("lin", "gradient", X, version=version)
        assert result.version == (version or 2)
        np.testing.assert_allclose(result.attributions["x"], np.full_like(X, k))
    np.testing.assert_allclose(client.gradient("top", X), np.full_like(X, 7.0))
    assert _states(client, "lin") == {1: "READY", 2: "READY"}


def test_saved_model_returns_the_analytic_gradient(client):
    x = np.random.default_rng(0).uniform(-2, 2, (5, 3)).astype(np.float32)
    y, g = client.gradient("sm", x, return_outputs=True)
    expected = np.stack([np.full(5, 5.0), 2 * x[:, 1], np.cos(x[:, 2])], axis=1)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, 5 * x[:, 0] + x[:, 1] ** 2 + np.sin(x[:, 2]), rtol=1e-5, atol=1e-6)
    info = client.model_info("sm", refresh=True)
    assert [(s.name, s.shape) for s in info.inputs] == [("x", (-1, 3))]


@pytest.mark.parametrize("name", ["sm", "top"])
def test_no_traces_after_warm_up_for_any_batch_size(client, name):
    before = dict(client.model_info(name, refresh=True).versions[-1].trace_counts)
    assert before  # warm-up traced the common calls
    width = 3 if name == "sm" else 4
    for batch in range(1, MAX_BUCKET + 1):
        x = np.ones((batch, width), np.float32)
        client.gradient(name, x)
        client.gradient(name, x, return_outputs=True)
        client.predict(name, x)
    assert dict(client.model_info(name, refresh=True).versions[-1].trace_counts) == before


def _health(server: Any, service: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def test_code_running_models_are_refused_by_default(server, client):
    from grpc_health.v1 import health_pb2

    for name, hint in (("lam", "Lambda"), ("old", ".h5")):
        (version,) = client.model_info(name, refresh=True).versions
        assert version.state == "FAILED"
        assert hint in version.message and "--trust-model-code" in version.message
        with pytest.raises(gradserve.Unavailable):
            client.gradient(name, X)
        assert _health(server, name) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(server, "lin") == health_pb2.HealthCheckResponse.SERVING


def test_code_running_models_are_served_with_trust(start_server, model_dir):
    """--model sources: a Lambda .keras file and an .h5 file (trusted), and a SavedModel folder."""
    sources = (ModelSource("lam", model_dir["lam"]), ModelSource("old", model_dir["old"]),
               ModelSource("saved", os.path.join(model_dir["root"], "sm", "1")))
    srv = start_server(ServerConfig(models=sources, trust_model_code=True,
                                    engine=EngineConfig(max_bucket=4, xla="off")))
    with gradserve.Client(srv.address, timeout=60) as c:
        np.testing.assert_allclose(c.gradient("lam", X), np.full_like(X, 3.0))
        np.testing.assert_allclose(c.gradient("old", X), np.full_like(X, 4.0))
        x = np.zeros((1, 3), np.float32)
        np.testing.assert_allclose(c.gradient("saved", x), [[5.0, 0.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("name", ["../lin", "lin/2", "bad name"])
def test_invalid_model_name_in_a_request(client, name):
    with pytest.raises(gradserve.InvalidArgument, match="model"):
        client.gradient(name, X)


def test_two_inputs_two_outputs_match_gradient_tape(demo_server):
    from gradserve.server.models import demo

    model = demo.build_multi()  # the same seeded weights as the served demo model
    rng = np.random.default_rng(1)
    inputs = {"a": rng.standard_normal((3, 3)).astype(np.float32), "b": rng.standard_normal((3, 2)).astype(np.float32)}
    for output in ("y1", "y2"):
        with gradserve.Client(demo_server.address, timeout=60) as c:
            got = c.gradient("multi", inputs, output=output)
        feed = {k: tf.constant(v) for k, v in inputs.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(feed.values()))
            y = tf.reduce_sum(model(feed)[output])
        want = tape.gradient(y, feed, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for name in ("a", "b"):
            np.testing.assert_allclose(got[name], want[name].numpy(), rtol=1e-5, atol=1e-7)


def test_integer_inputs_forward_but_not_as_wrt(client, model_dir):
    inputs = {"tok": np.array([[0, 1, 4], [2, 2, 3]], np.int32), "cont": np.array([[0.5, -1], [2, 1]], np.float32)}
    want = model_dir["emb"]([tf.constant(inputs["tok"]), tf.constant(inputs["cont"])]).numpy()
    np.testing.assert_allclose(client.predict("emb", inputs), want, rtol=1e-5, atol=1e-6)
    grads = client.gradient("emb", inputs, wrt=["cont"])
    kernel = model_dir["emb"].get_layer("y").get_weights()[0][-2:, 0]
    np.testing.assert_allclose(grads["cont"], np.tile(kernel, (2, 1)), rtol=1e-5)
    with pytest.raises(gradserve.FailedPrecondition, match="tok"):
        client.gradient("emb", inputs, wrt=["tok"])


def test_hot_reload_drain_and_failed_version_under_load(server, client, model_dir):
    """Version 3 appears and takes over, is removed and drained, a corrupt version 4 fails:
    a concurrent caller of version 0 sees no failure at any point."""
    root = os.path.join(model_dir["root"], "lin")
    stop = threading.Event()
    failures: list[BaseException] = []
    seen: set[float] = set()

    def load() -> None:
        with gradserve.Client(server.address, timeout=60) as c:
            while not stop.is_set():
                try:
                    seen.add(float(c.gradient("lin", X)[0, 0]))
                except BaseException as exc:  # noqa: BLE001 - every failure counts
                    failures.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        shutil.copytree(model_dir["lin3"], os.path.join(root, "3"))
        _wait_for(lambda: _states(client, "lin").get(3) == "READY", "version 3 READY")
        _wait_for(lambda: 3.0 in seen, "version 3 to take traffic")
        np.testing.assert_allclose(client.gradient("lin", X), np.full_like(X, 3.0))

        # Removing version 3 while a request holds it: UNLOADING, not gone, until released.
        v3 = server.repository.get("lin", 3)
        with v3.acquire():
            shutil.rmtree(os.path.join(root, "3"))
            _wait_for(lambda: _states(client, "lin").get(3) == "UNLOADING", "version 3 UNLOADING")
            np.testing.assert_allclose(client.gradient("lin", X), np.full_like(X, 2.0))
            # Rescans go on while version 3 drains: a corrupt version 4 is tried and FAILED.
            os.makedirs(os.path.join(root, "4"))
            with open(os.path.join(root, "4", "model.keras"), "wb") as f:
                f.write(b"not a zip archive")
            _wait_for(lambda: _states(client, "lin").get(4) == "FAILED", "version 4 FAILED")
            assert _states(client, "lin").get(3) == "UNLOADING"  # still draining
        _wait_for(lambda: 3 not in _states(client, "lin"), "version 3 removed")
        assert client.model_info("lin").versions[-1].message
        np.testing.assert_allclose(client.gradient("lin", X), np.full_like(X, 2.0))
    finally:
        stop.set()
        worker.join(60)
    assert not failures, failures[:3]
    assert {2.0, 3.0} <= seen

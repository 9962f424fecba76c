"""Shapley values and partial dependence through a real server, the SDK, the async SDK and the CLI.

Models are built here (a linear model, a small nonlinear one, a pure interaction x0 * x1, a
two-input model, an image classifier, an integer-input model) and the values are checked against
closed forms, against the ``shap`` library's KernelExplainer and scikit-learn's
``partial_dependence`` calling the same Keras models in this process, and against the limits.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import grpc
import numpy as np
import pytest

import gradserve
from gradserve._explain import ShapOptions, plan_shap
from gradserve._options import Selection
from gradserve.v1 import sensitivity_service_pb2 as pb
from subprocess_server import free_port

with warnings.catch_warnings():
    # shap imports matplotlib's colormaps, which warn about their own set_bad on import.
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    import shap
    from shap.utils._legacy import DenseData

W = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
BIAS = 0.25
WA, WB = np.array([1.0, 2.0, -1.0], np.float32), np.array([0.5, -3.0], np.float32)
#: The server's limits: exact SHAP of 4 features with 40 background rows is exactly at its limit.
MAX_EXACT = 2 ** 4 * 40
MAX_EVALUATIONS = 200_000
MAX_FEATURES = 8
RNG = np.random.default_rng(0)


def build_linear() -> Any:
    import keras

    x = keras.Input((4,), name="x")
    dense = keras.layers.Dense(1, name="y")
    model = keras.Model(x, dense(x))
    dense.set_weights([W[:, None], np.array([BIAS], np.float32)])
    return model


def build_mlp() -> Any:
    import keras

    x = keras.Input((5,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="h")(x)
    model = keras.Model(x, keras.layers.Dense(3, name="y")(h))
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0.0, 0.7, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def build_product() -> Any:
    import keras

    x = keras.Input((3,), name="x")
    pick = [keras.layers.Dense(1, use_bias=False, name=f"pick{i}") for i in range(2)]
    model = keras.Model(x, keras.layers.Multiply(name="y")([pick[0](x), pick[1](x)]))
    pick[0].set_weights([np.array([[1.0], [0.0], [0.0]], np.float32)])
    pick[1].set_weights([np.array([[0.0], [1.0], [0.0]], np.float32)])
    return model


def build_two() -> Any:
    import keras

    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    da, db = keras.layers.Dense(1, use_bias=False, name="da"), keras.layers.Dense(1, name="db")
    model = keras.Model({"a": a, "b": b}, keras.layers.Add(name="y")([da(a), db(b)]))
    da.set_weights([WA[:, None]])
    db.set_weights([WB[:, None], np.array([1.0], np.float32)])
    return model


def build_classifier() -> Any:
    import keras

    x = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="probs")(h))
    rng = np.random.default_rng(5)
    model.set_weights([rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def build_counts() -> Any:
    import tensorflow as tf

    from gradserve.server.core.models import TensorSpec
    from gradserve.server.models.modelfn import ModelFunction

    def call(feed: Any) -> dict[str, Any]:
        return {"y": tf.reduce_sum(tf.cast(feed["n"], tf.float32) ** 2, axis=1, keepdims=True)}

    return ModelFunction((TensorSpec("n", np.dtype(np.int32), (None, 2)),),
                         (TensorSpec("y", np.dtype(np.float32), (None, 1)),), call)


class Counter:
    """A model ``y = sum(x)`` over x (None, 4) that, once armed, records the rows of each engine
    call and holds the first one until released."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.armed = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()

    def reset(self) -> None:
        self.armed.clear()
        self.calls.clear()
        self.held.clear()
        self.release.clear()

    def model(self) -> Any:
        import tensorflow as tf

        from gradserve.server.core.models import TensorSpec
        from gradserve.server.models.modelfn import ModelFunction

        def hook(x: np.ndarray) -> np.ndarray:
            if self.armed.is_set():
                self.calls.append(len(x))
                if not self.held.is_set():
                    self.held.set()
                    self.release.wait(120)
            return x.sum(axis=1, keepdims=True)

        def call(feed: Any) -> dict[str, Any]:
            y = tf.numpy_function(hook, [feed["x"]], tf.float32)
            return {"y": tf.reshape(y, (-1, 1))}

        return ModelFunction((TensorSpec("x", np.dtype(np.float32), (None, 4)),),
                             (TensorSpec("y", np.dtype(np.float32), (None, 1)),), call)


COUNTER = Counter()
MODELS = {"linear": build_linear, "mlp": build_mlp, "product": build_product, "two": build_two,
          "classifier": build_classifier, "counts": build_counts, "counter": COUNTER.model}


@pytest.fixture(scope="module")
def server(start_server: Any) -> Any:
    from gradserve.server.config import BatchingConfig, EngineConfig, Limits, ServerConfig

    limits = Limits(max_exact_shap_evaluations=MAX_EXACT, max_explain_evaluations=MAX_EVALUATIONS,
                    max_shap_features=MAX_FEATURES, chunk_elements=4096)
    config = ServerConfig(engine=EngineConfig(xla="off", backend="tensorflow"), limits=limits,
                          model_batching={"counter": BatchingConfig(enabled=False)}, http_port=free_port(),
                          metrics_port=free_port())
    return start_server(config, models=MODELS)


@pytest.fixture()
def c(server: Any) -> Any:
    with gradserve.Client(server.address, timeout=120) as client:
        yield client


def keras_function(build: Any, index: int | None = None) -> Any:
    """``build``'s model in this process, as shap and scikit-learn call it (float64 rows in)."""
    model = build()

    def f(z: np.ndarray) -> np.ndarray:
        y = np.asarray(model(np.asarray(z, np.float32).reshape((len(z),) + tuple(model.input_shape[1:]))),
                       np.float64)
        return y[:, index] if index is not None else y.reshape(len(y), -1).sum(axis=1)
    return f


# -- Shapley values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, samples", [("exact", None), ("kernel", None), ("kernel", 6), ("gradient", 30)])
def test_linear_model_values_are_w_times_the_distance_to_the_background_mean(c: Any, method: str,
                                                                             samples: int | None) -> None:
    background = RNG.normal(size=(10, 4)).astype(np.float32)
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    phi, base = c.shap("linear", x, background=background, method=method, samples=samples, seed=0, return_base=True)
    expected = W * (x.astype(np.float64) - background.astype(np.float64).mean(axis=0))
    assert phi.shape == x.shape and phi.dtype == np.float64 and base.shape == (6,)
    np.testing.assert_allclose(phi, expected, atol=1e-5)
    np.testing.assert_allclose(base, background.astype(np.float64).mean(axis=0) @ W + BIAS, atol=1e-5)


def test_exact_and_kernel_keep_efficiency_on_a_nonlinear_model(c: Any) -> None:
    background = RNG.normal(size=(20, 5)).astype(np.float32)
    x = RNG.normal(size=(4, 5)).astype(np.float32)
    f_x = c.predict("mlp", x)[:, 2].astype(np.float64)
    exact, base = c.shap("mlp", x, background=background, method="exact", target=2, return_base=True)
    np.testing.assert_allclose(exact.sum(axis=1), f_x - base, atol=1e-4)
    for samples in (None, 12):   # every coalition, and a sample of them
        phi, base = c.shap("mlp", x, background=background, samples=samples, seed=1, target=2, return_base=True)
        np.testing.assert_allclose(phi.sum(axis=1), f_x - base, atol=1e-4)
    np.testing.assert_allclose(c.shap("mlp", x, background=background, target=2), exact, atol=1e-5)


def test_a_pure_interaction_is_split_equally(c: Any) -> None:
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    background = np.zeros((1, 3), np.float32)
    for method in ("exact", "kernel"):
        phi = c.shap("product", x, background=background, method=method)
        product = x[:, 0].astype(np.float64) * x[:, 1]
        np.testing.assert_allclose(phi[:, 0], phi[:, 1], atol=1e-6)
        np.testing.assert_allclose(phi[:, 0], product / 2, atol=1e-6)
        np.testing.assert_allclose(phi[:, 2], 0.0, atol=1e-6)


def test_kernel_equals_shaps_kernel_explainer_where_both_enumerate_every_coalition(c: Any) -> None:
    background = RNG.normal(size=(30, 5)).astype(np.float32)
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    explainer = shap.KernelExplainer(keras_function(build_mlp, 1), background.astype(np.float64))
    expected = explainer.shap_values(x.astype(np.float64), nsamples=2 ** 5 - 2, silent=True)
    phi, base = c.shap("mlp", x, background=background, samples=2 ** 5 - 2, target=1, return_base=True)
    np.testing.assert_allclose(phi, expected, atol=2e-5)
    np.testing.assert_allclose(base, explainer.expected_value, atol=2e-5)


def test_superpixel_groups_equal_shaps_grouped_kernel_explainer(c: Any) -> None:
    images = RNG.uniform(size=(2, 8, 8, 1)).astype(np.float32)
    background = RNG.uniform(size=(6, 8, 8, 1)).astype(np.float32)
    segments = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, axis=0), 4, axis=1)   # four 4x4 superpixels
    groups = [np.flatnonzero(segments.reshape(-1) == g) for g in range(4)]
    data = DenseData(background.reshape(6, -1).astype(np.float64), [f"s{g}" for g in range(4)], groups)
    explainer = shap.KernelExplainer(keras_function(build_classifier, 0), data)
    expected = explainer.shap_values(images.reshape(2, -1).astype(np.float64), nsamples=14, silent=True)
    phi = c.shap("classifier", images, background=background, features=segments, target=0)
    assert phi.shape == (2, 4)
    np.testing.assert_allclose(phi, expected, atol=2e-6)


def test_gradient_shap_approaches_the_exact_values(c: Any) -> None:
    background = RNG.normal(size=(8, 5)).astype(np.float32)
    x = RNG.normal(size=(2, 5)).astype(np.float32)
    exact = c.shap("mlp", x, background=background, method="exact", target=0)
    approx = c.shap("mlp", x, background=background, method="gradient", samples=8 * 400, seed=0, target=0)
    assert np.abs(approx - exact).max() < 0.15 * np.abs(exact).max()
    again = c.shap("mlp", x, background=background, method="gradient", samples=8 * 400, seed=0, target=0,
                   batch_size=1)
    np.testing.assert_allclose(again, approx, rtol=1e-6)   # same seed, split differently: same values


def test_multi_input_values_mirror_the_inputs_and_inputs_can_be_groups(c: Any) -> None:
    a, b = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
    ba, bb = RNG.normal(size=(5, 3)).astype(np.float32), RNG.normal(size=(5, 2)).astype(np.float32)
    phi = c.shap("two", {"a": a, "b": b}, background={"a": ba, "b": bb}, method="exact")
    assert set(phi) == {"a", "b"}
    np.testing.assert_allclose(phi["a"], WA * (a - ba.mean(axis=0)), atol=1e-5)
    np.testing.assert_allclose(phi["b"], WB * (b - bb.mean(axis=0)), atol=1e-5)
    listed = c.shap("two", [a, b], background=[ba, bb], method="exact")
    assert isinstance(listed, list) and len(listed) == 2
    grouped = c.shap("two", [a, b], background=[ba, bb], features=["a", "b"])
    np.testing.assert_allclose(grouped, np.stack([phi["a"].sum(axis=1), phi["b"].sum(axis=1)], axis=1), atol=1e-5)


def test_integer_inputs_take_kernel_but_not_gradient(c: Any) -> None:
    n = np.array([[1, 2], [3, 0]], np.int32)
    background = np.array([[0, 0], [2, 1]], np.int32)
    phi = c.shap("counts", n, background=background, method="exact")
    np.testing.assert_allclose(phi, n.astype(float) ** 2 - (background.astype(float) ** 2).mean(axis=0), atol=1e-5)
    with pytest.raises(gradserve.FailedPrecondition, match="int32"):
        c.shap("counts", n, background=background, method="gradient")


def test_argmax_explains_each_rows_own_class(c: Any) -> None:
    images = RNG.uniform(size=(3, 8, 8, 1)).astype(np.float32)
    background = RNG.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    segments = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, axis=0), 4, axis=1)
    probs = c.predict("classifier", images).astype(np.float64)
    picked = probs.argmax(axis=1)
    phi, base = c.shap("classifier", images, background=background, features=segments, target="argmax",
                       method="exact", return_base=True)
    np.testing.assert_allclose(phi.sum(axis=1), probs[np.arange(3), picked] - base, atol=1e-5)
    by_index, _ = c.shap("classifier", images, background=background, features=segments, target=picked.tolist(),
                         method="exact", return_base=True)
    np.testing.assert_allclose(by_index, phi, atol=1e-7)


# -- partial dependence --------------------------------------------------------------------------------
class Regressor:
    """A model served here, in this process, as a scikit-learn regressor."""

    _estimator_type = "regressor"

    def __init__(self, f: Any) -> None:
        self.f = f

    def fit(self, x: Any, y: Any = None) -> Regressor:
        self.fitted_ = True
        return self

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self.f(np.asarray(x)))

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {}


def test_partial_dependence_of_a_linear_model_is_a_line_with_slope_w(c: Any) -> None:
    rows = RNG.normal(size=(40, 4)).astype(np.float32)
    for j in range(4):
        pd = c.partial_dependence("linear", rows, feature=j)
        grid = pd["grid"]
        assert grid.shape == (20,) and pd["individual"].shape == (40, 20)
        np.testing.assert_allclose(np.diff(pd["average"]) / np.diff(grid), W[j], rtol=1e-4)
        np.testing.assert_allclose(pd["average"], pd["individual"].mean(axis=0), atol=1e-6)
        others = rows.astype(np.float64) @ W + BIAS - W[j] * rows[:, j]
        np.testing.assert_allclose(pd["individual"], others[:, None] + W[j] * grid[None, :], atol=1e-4)


@pytest.mark.parametrize("features", [[2], [0, 3]])
def test_partial_dependence_equals_scikit_learns(c: Any, features: list[int]) -> None:
    from sklearn.inspection import partial_dependence

    rows = RNG.normal(size=(25, 5)).astype(np.float32)
    expected = partial_dependence(Regressor(keras_function(build_mlp, 0)).fit(rows), rows.astype(np.float64),
                                  features, grid_resolution=9, kind="both")
    pd = c.partial_dependence("mlp", rows, feature=features[0] if len(features) == 1 else tuple(features),
                              grid_resolution=9, target=0)
    for ours, theirs in zip(pd["grid_values"], expected["grid_values"]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    np.testing.assert_allclose(pd["average"], expected["average"][0], atol=1e-5)
    np.testing.assert_allclose(pd["individual"], expected["individual"][0], atol=1e-5)


def test_two_way_partial_dependence_of_a_product_and_custom_grids(c: Any) -> None:
    rows = RNG.normal(size=(10, 3)).astype(np.float32)
    g0, g1 = np.linspace(-1, 1, 5), np.array([0.0, 2.0])
    pd = c.partial_dependence("product", rows, feature=(0, 1), grid=[g0, g1], kind="average")
    assert set(pd) == {"grid_values", "grid", "average"}
    np.testing.assert_allclose(pd["average"], np.outer(g0, g1), atol=1e-6)
    one = c.partial_dependence("product", rows, feature=0, grid=g0, kind="individual")
    np.testing.assert_allclose(one["individual"], rows[:, 1:2].astype(np.float64) * g0[None, :], atol=1e-6)
    assert "average" not in one


def test_async_client_twins(server: Any) -> None:
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    background = RNG.normal(size=(7, 4)).astype(np.float32)

    async def main() -> tuple[Any, Any]:
        async with gradserve.AsyncClient(server.address, timeout=120) as ac:
            seen: list[tuple[int, int]] = []
            phi = await ac.shap("linear", x, background=background, method="kernel", batch_size=1,
                                progress=lambda done, total: seen.append((done, total)))
            assert seen == [(1, 3), (2, 3), (3, 3)]
            pd = await ac.partial_dependence("linear", background, feature=1, grid_resolution=5)
            with pytest.raises(gradserve.NotFound):
                await ac.shap("nope", x, background=background)
        return phi, pd

    phi, pd = asyncio.run(main())
    np.testing.assert_allclose(phi, W * (x.astype(np.float64) - background.astype(np.float64).mean(axis=0)),
                               atol=1e-5)
    assert pd["average"].shape == (5,)


def test_calls_are_counted_under_their_method_and_evaluated_in_few_engine_calls(server: Any, c: Any) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{server.server.metrics.port}/metrics"
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    before = scrape()
    # 2 rows, 10 background rows, every coalition of 4 features: 2 + 10 + 2 x 14 x 10 = 292 evaluations.
    c.shap("linear", np.ones((2, 4), np.float32), background=np.zeros((10, 4), np.float32))
    c.partial_dependence("linear", np.ones((5, 4), np.float32), feature=1, grid=np.arange(3.0))
    labels = {"protocol": "native", "model": "linear", "code": "OK"}
    after = scrape()
    end = time.monotonic() + 30   # a call is counted just after its answer was sent
    while time.monotonic() < end and delta("gradserve_requests_total", method="partial_dependence", **labels) < 1:
        time.sleep(0.05)
        after = scrape()
    assert delta("gradserve_requests_total", method="shap", **labels) == 1
    assert delta("gradserve_requests_total", method="partial_dependence", **labels) == 1
    assert delta("gradserve_engine_batch_size_sum", model="linear") == 292 + 5 * 3
    assert delta("gradserve_engine_batch_size_count", model="linear") == 3   # f(rows, background), coalitions, grid


# -- limits, errors, deadlines ----------------------------------------------------------------------------
def raw(server: Any, request: pb.ComputeRequest, timeout: float = 60) -> grpc.RpcError:
    """The error the server answers ``request`` with (bypassing the SDK's own checks)."""
    with grpc.insecure_channel(server.address) as channel:
        compute = channel.unary_unary("/gradserve.v1.SensitivityService/Compute",
                                      request_serializer=pb.ComputeRequest.SerializeToString,
                                      response_deserializer=pb.ComputeResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            compute(request, timeout=timeout)
    return info.value


def shap_request(model: str = "linear", x: Any = None, background: Any = None, **options: Any) -> pb.ComputeRequest:
    x = {"x": np.ones((2, 4), np.float32)} if x is None else x
    background = {"x": np.zeros((3, 4), np.float32)} if background is None else background
    return plan_shap(None, model, x, background, ShapOptions(**options), Selection()).first


def edit(request: pb.ComputeRequest, change: Any) -> pb.ComputeRequest:
    change(request)
    return request


@pytest.mark.parametrize("make, code, match", [
    (lambda: shap_request(background={"x": np.zeros((3, 4), np.float64)}), grpc.StatusCode.INVALID_ARGUMENT,
     r"background\['x'\].dtype: got float64, the model expects float32"),
    (lambda: shap_request(background={"x": np.zeros((3, 5), np.float32)}), grpc.StatusCode.INVALID_ARGUMENT,
     r"background\['x'\].shape: dimension 1 is 5"),
    (lambda: edit(shap_request(), lambda r: r.background.clear()), grpc.StatusCode.INVALID_ARGUMENT,
     r"background: missing input 'x'"),
    (lambda: edit(shap_request(), lambda r: r.background["z"].CopyFrom(r.background["x"])),
     grpc.StatusCode.NOT_FOUND, "background: unknown input 'z'"),
    (lambda: edit(shap_request(), lambda r: setattr(r.shap, "algorithm", 9)), grpc.StatusCode.INVALID_ARGUMENT,
     "shap.algorithm: unknown value 9"),
    (lambda: edit(shap_request(), lambda r: setattr(r.shap, "samples", -5)), grpc.StatusCode.INVALID_ARGUMENT,
     "shap.samples: -5"),
    (lambda: edit(shap_request(method="exact"), lambda r: setattr(r.shap, "samples", 10)),
     grpc.StatusCode.INVALID_ARGUMENT, "shap.samples: 10, but the exact algorithm evaluates every coalition"),
    (lambda: edit(shap_request(), lambda r: r.shap.feature_groups["x"].CopyFrom(
        gradserve._codec.encode(np.array([0, 1, 3, 3], np.int32)))),
     grpc.StatusCode.INVALID_ARGUMENT, "group 2 has no elements"),
    (lambda: edit(shap_request(), lambda r: r.shap.feature_groups["x"].CopyFrom(
        gradserve._codec.encode(np.array([0, 1], np.int32)))),
     grpc.StatusCode.INVALID_ARGUMENT, r"shap.feature_groups\['x'\]: 2 labels for 4 elements"),
    (lambda: shap_request(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (lambda: shap_request(model="counts", x={"n": np.ones((1, 2), np.int32)},
                          background={"n": np.ones((1, 2), np.int32)}, method="gradient"),
     grpc.StatusCode.FAILED_PRECONDITION, "input 'n' has dtype int32"),
])
def test_bad_shap_requests_are_refused_before_any_work(server: Any, c: Any, make: Any, code: Any,
                                                      match: str) -> None:
    error = raw(server, make())
    assert error.code() == code, error.details()
    assert re.search(match, error.details()), error.details()
    np.testing.assert_allclose(c.predict("linear", np.zeros((1, 4), np.float32)), [[BIAS]])   # still serving


def pdp_request(change: Any) -> pb.ComputeRequest:
    request = pb.ComputeRequest(model="linear", method=pb.METHOD_PARTIAL_DEPENDENCE)
    request.inputs["x"].CopyFrom(gradserve._codec.encode(RNG.normal(size=(5, 4)).astype(np.float32)))
    request.partial_dependence.features.add(index=1)
    change(request)
    return request


@pytest.mark.parametrize("make, match", [
    (lambda: pdp_request(lambda r: setattr(r.partial_dependence.features[0], "index", 4)),
     r"partial_dependence.features\[0\].index: 4 is out of range for input 'x' with 4 elements"),
    (lambda: pdp_request(lambda r: r.partial_dependence.features[0].__setattr__("input", "q")),
     "unknown input 'q'"),
    (lambda: pdp_request(lambda r: r.partial_dependence.ClearField("features")), "one feature or two"),
    (lambda: pdp_request(lambda r: setattr(r.partial_dependence, "grid_resolution", 1)),
     "grid_resolution: 1"),
    (lambda: pdp_request(lambda r: setattr(r.partial_dependence, "lower_percentile", 0.99)),
     "percentiles"),
    (lambda: pdp_request(lambda r: setattr(r.partial_dependence, "kind", 7)),
     "partial_dependence.kind: unknown value 7"),
    (lambda: pdp_request(lambda r: r.partial_dependence.grid.add().CopyFrom(
        gradserve._codec.encode(np.array([0.0, np.nan])))), r"grid\[0\]: .*finite"),
])
def test_bad_partial_dependence_requests_are_invalid_argument(server: Any, make: Any, match: str) -> None:
    error = raw(server, make())
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.details()
    assert re.search(match, error.details()), error.details()


def test_exact_limit_at_its_edge(c: Any) -> None:
    x = np.ones((1, 4), np.float32)
    phi = c.shap("linear", x, background=np.zeros((40, 4), np.float32), method="exact")   # 2^4 x 40: at the limit
    np.testing.assert_allclose(phi, W[None, :], atol=1e-6)
    with pytest.raises(gradserve.InvalidArgument, match=r"2\^4 coalitions x 41 background rows = 656 .*"
                                                         f"max_exact_shap_evaluations={MAX_EXACT}"):
        c.shap("linear", x, background=np.zeros((41, 4), np.float32), method="exact")


def test_evaluation_limit_at_its_edge(c: Any) -> None:
    # kernel: rows x (coalitions x background + 1) + background = 2 * (14 * b + 1) + b
    b = (MAX_EVALUATIONS - 2) // 29
    at_limit = 2 * (14 * b + 1) + b
    over = b + 1
    x = np.ones((2, 4), np.float32)
    c.shap("linear", x, background=np.zeros((b, 4), np.float32))   # every coalition: 14
    assert at_limit <= MAX_EVALUATIONS < 2 * (14 * over + 1) + over
    with pytest.raises(gradserve.InvalidArgument, match=f"max_explain_evaluations={MAX_EVALUATIONS}"):
        c.shap("linear", x, background=np.zeros((over, 4), np.float32))
    rows = np.zeros((MAX_EVALUATIONS // 20 + 1, 4), np.float32)
    with pytest.raises(gradserve.InvalidArgument, match="max_explain_evaluations"):
        c.partial_dependence("linear", rows, feature=0, grid=np.linspace(0, 1, 20))


def test_deadline_stops_the_work_between_chunks(server: Any, c: Any) -> None:
    # 1002 evaluations of the rows and the background, then 2 rows x 14 coalitions x 1000
    # background rows = 28000, in chunks of 1024 rows: the first engine call is held past the
    # call's deadline; once released, the engine stops between its batches and no chunk follows.
    x = np.ones((2, 4), np.float32)
    background = RNG.normal(size=(1000, 4)).astype(np.float32)
    COUNTER.reset()
    COUNTER.armed.set()
    try:
        with pytest.raises(gradserve.DeadlineExceeded):
            c.shap("counter", x, background=background, timeout=1.0)
        assert COUNTER.held.is_set()
    finally:
        COUNTER.release.set()
    # The server's work for the call ends with its held chunk: a later call on the model (served
    # after it) finds at most the one chunk that was waiting beside it evaluated.
    c.predict("counter", np.ones((1, 4), np.float32))
    assert sum(COUNTER.calls) <= 2 * 1024, COUNTER.calls


def test_a_cancelled_call_stops_its_work(server: Any, c: Any) -> None:
    request = shap_request("counter", background={"x": RNG.normal(size=(1000, 4)).astype(np.float32)})
    COUNTER.reset()
    COUNTER.armed.set()
    with grpc.insecure_channel(server.address) as channel:
        compute = channel.unary_unary("/gradserve.v1.SensitivityService/Compute",
                                      request_serializer=pb.ComputeRequest.SerializeToString,
                                      response_deserializer=pb.ComputeResponse.FromString)
        future = compute.future(request, timeout=60)
        try:
            assert COUNTER.held.wait(60)   # the call's first engine call is running
            future.cancel()
            assert future.cancelled()
        finally:
            COUNTER.release.set()
    c.predict("counter", np.ones((1, 4), np.float32))   # served after what the cancelled call still ran
    assert sum(COUNTER.calls) <= 2 * 1024, COUNTER.calls


def test_feature_limit_at_its_edge(c: Any) -> None:
    images = RNG.uniform(size=(1, 8, 8, 1)).astype(np.float32)
    background = RNG.uniform(size=(2, 8, 8, 1)).astype(np.float32)
    bands = np.repeat(np.arange(8), 8).reshape(8, 8).T   # 8 vertical bands
    assert c.shap("classifier", images, background=background, features=bands, target=0).shape == (1, MAX_FEATURES)
    with pytest.raises(gradserve.InvalidArgument, match=f"9 features, more than max_shap_features={MAX_FEATURES}"):
        c.shap("classifier", images, background=background, features=np.minimum(np.arange(64), 8).reshape(8, 8),
               target=0)
    with pytest.raises(gradserve.InvalidArgument, match="64 features, more than max_shap_features"):
        c.shap("classifier", images, background=background, method="exact", target=0)   # one per pixel
    # The gradient algorithm has no regression: every element may be a feature.
    assert c.shap("classifier", images, background=background, method="gradient", samples=4,
                  target=0).shape == images.shape


def test_ice_curves_past_the_message_limit_are_resource_exhausted(start_server: Any) -> None:
    from gradserve.server.config import Limits, ServerConfig

    small = start_server(ServerConfig(limits=Limits(max_message_bytes=1 << 20)), models={"linear": build_linear})
    grid = np.linspace(0, 1, 120)
    edge = ((1 << 20) - 64 * 1024) // (8 * len(grid))   # rows whose ICE curves fill the message to the byte
    with gradserve.Client(small.address, timeout=120) as c:
        pd = c.partial_dependence("linear", np.zeros((edge, 4), np.float32), feature=0, grid=grid)
        assert pd["individual"].shape == (edge, 120)
        with pytest.raises(gradserve.ResourceExhausted, match="ICE curves .* more than max_message_bytes=1048576"):
            c.partial_dependence("linear", np.zeros((edge + 1, 4), np.float32), feature=0, grid=grid)
        pd = c.partial_dependence("linear", np.zeros((edge + 1, 4), np.float32), feature=0, grid=grid, kind="average")
        np.testing.assert_allclose(pd["average"], W[0] * grid + BIAS, atol=1e-5)


def test_serve_flags_set_the_explain_limits() -> None:
    from gradserve.server.config import Limits
    from gradserve.server.process import cli

    args = cli.build_parser().parse_args(["serve", "--max-explain-evaluations", "200000",
                                          "--max-exact-shap-evaluations", "640", "--max-shap-features", "8"])
    limits = cli._limits(args)
    assert (limits.max_explain_evaluations, limits.max_exact_shap_evaluations, limits.max_shap_features) == (
        MAX_EVALUATIONS, MAX_EXACT, MAX_FEATURES)
    default = cli._limits(cli.build_parser().parse_args(["serve"]))
    assert (default.max_explain_evaluations, default.max_exact_shap_evaluations, default.max_shap_features) == (
        Limits().max_explain_evaluations, Limits().max_exact_shap_evaluations, Limits().max_shap_features)


def test_cli_shap_and_pdp_write_values_and_plots(server: Any, tmp_path: Any) -> None:
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    background = RNG.normal(size=(12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "bg.csv", background, delimiter=",", header="a,b,c,d", comments="")
    cmd = [sys.executable, "-m", "gradserve"]
    out = subprocess.run(cmd + ["shap", "linear", "--target", server.address, "--input", str(tmp_path / "x.npy"),
                                "--background", str(tmp_path / "bg.csv"), "--method", "exact",
                                "-o", str(tmp_path / "phi.npy"), "--plot", str(tmp_path / "shap.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "phi.npy"), W * (x - background.mean(axis=0)), atol=1e-5)
    assert (tmp_path / "shap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run(cmd + ["pdp", "linear", "--target", server.address, "--background", str(tmp_path / "bg.csv"),
                                "--feature", "0", "--feature", "0,2", "--plot", str(tmp_path / "pdp.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "average" in out.stdout and "rows a, columns c" in out.stdout
    assert (tmp_path / "pdp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run(cmd + ["pdp", "linear", "--target", server.address, "--background", str(tmp_path / "bg.csv"),
                                "--feature", "9"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "out of range" in out.stderr


# -- the Open Inference Protocol ----------------------------------------------------------------------------
def _oip_inputs(module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    made = []
    for name, array in arrays.items():
        inp = module.InferInput(name, list(array.shape), {"float32": "FP32", "int32": "INT32",
                                                          "float64": "FP64"}[array.dtype.name])
        inp.set_data_from_numpy(array)
        made.append(inp)
    return made


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_oip_shap_and_partial_dependence_answer_as_the_sdk(server: Any, c: Any, transport: str) -> None:
    import tritonclient.grpc as tc_grpc
    import tritonclient.http as tc_http
    from tritonclient.utils import InferenceServerException

    module: Any = tc_grpc if transport == "grpc" else tc_http
    url = server.address if transport == "grpc" else f"127.0.0.1:{server.server.rest.port}"
    client = module.InferenceServerClient(url)
    try:
        x = RNG.normal(size=(3, 5)).astype(np.float32)
        background = RNG.normal(size=(6, 5)).astype(np.float32)
        inputs = _oip_inputs(module, {"x": x, "background/x": background,
                                      "feature_groups/x": np.array([0, 0, 1, 2, 2], np.int32)})
        result = client.infer("mlp", inputs, parameters={"method": "shap", "algorithm": "exact", "target": 1,
                                                         "return_base": True})
        phi, base = c.shap("mlp", x, background=background, method="exact", target=1, return_base=True,
                           features=[[0, 1], [2], [3, 4]])
        np.testing.assert_allclose(result.as_numpy("attributions/groups"), phi, rtol=1e-12)
        np.testing.assert_allclose(result.as_numpy("extras/base"), base, rtol=1e-12)
        rows = RNG.normal(size=(8, 5)).astype(np.float32)
        result = client.infer("mlp", _oip_inputs(module, {"x": rows, "grid/1": np.linspace(-1, 1, 4)}),
                              parameters={"method": "partial_dependence", "feature": "2,4", "target": 0,
                                          "grid_resolution": 7, "kind": "average"})
        pd = c.partial_dependence("mlp", rows, feature=(2, 4), grid=[None, np.linspace(-1, 1, 4)], grid_resolution=7,
                                  target=0, kind="average")
        np.testing.assert_allclose(result.as_numpy("extras/average"), pd["average"], rtol=1e-12)
        np.testing.assert_allclose(result.as_numpy("extras/grid_values/0"), pd["grid_values"][0], rtol=1e-12)
        assert result.as_numpy("extras/individual") is None
        # A bad value gets the native API's message.
        with pytest.raises(InferenceServerException) as info:
            client.infer("linear", _oip_inputs(module, {"x": np.ones((1, 4), np.float32),
                                                        "background/x": np.ones((1, 3), np.float32)}),
                         parameters={"method": "shap"})
        assert "background['x'].shape: dimension 1 is 3 but the model expects 4" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("linear", _oip_inputs(module, {"x": np.ones((2, 4), np.float32)}),
                         parameters={"method": "partial_dependence", "feature": "x:9"})
        assert "partial_dependence.features[0].index: 9 is out of range for input 'x'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("linear", _oip_inputs(module, {"x": np.ones((2, 4), np.float32)}),
                         parameters={"method": "shap", "algorithm": "lime"})
        assert "algorithm: expected one of" in info.value.message()
        # The limits, at their edges, as natively.
        one = {"x": np.ones((1, 4), np.float32)}
        at = client.infer("linear", _oip_inputs(module, {**one, "background/x": np.zeros((40, 4), np.float32)}),
                          parameters={"method": "shap", "algorithm": "exact"})
        np.testing.assert_allclose(at.as_numpy("attributions/x"), W[None, :], atol=1e-6)
        with pytest.raises(InferenceServerException) as info:
            client.infer("linear", _oip_inputs(module, {**one, "background/x": np.zeros((41, 4), np.float32)}),
                         parameters={"method": "shap", "algorithm": "exact"})
        assert f"= 656 evaluations per row, more than max_exact_shap_evaluations={MAX_EXACT}" in info.value.message()
        rows = {"x": np.zeros((MAX_EVALUATIONS // 20, 4), np.float32)}
        at = client.infer("linear", _oip_inputs(module, {**rows, "grid/0": np.linspace(0, 1, 20)}),
                          parameters={"method": "partial_dependence", "feature": 0, "kind": "average"})
        assert at.as_numpy("extras/average").shape == (20,)
        with pytest.raises(InferenceServerException) as info:
            client.infer("linear", _oip_inputs(module, {**rows, "grid/0": np.linspace(0, 1, 21)}),
                         parameters={"method": "partial_dependence", "feature": 0, "kind": "average"})
        assert f"more than max_explain_evaluations={MAX_EVALUATIONS}" in info.value.message()
    finally:
        client.close()

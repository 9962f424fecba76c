"""Sensitivity methods through the SDK against a live server, checked against closed forms.

One module-wide server hosts small models whose attributions are known exactly: a linear map,
y = 5 x0 + x1^2 + sin x2, sum(x^3), a global-average-pooling CNN (Grad-CAM), a softmax
classifier (use_logits) and an embedding model (layer attribution for integer inputs). A second
server with a tiny ``chunk_elements`` shows that results do not depend on the chunk size.
"""
from __future__ import annotations

from typing import Any, Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradserve

W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]], np.float32)   # (inputs, outputs)
C = np.array([0.3, -0.7], np.float32)
RULES = ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


class ClosedForm(keras.layers.Layer):
    """y = 5 x0 + x1^2 + sin x2."""

    def call(self, x: Any) -> Any:
        return keras.ops.expand_dims(5.0 * x[:, 0] + x[:, 1] ** 2 + keras.ops.sin(x[:, 2]), -1)


class Cubes(keras.layers.Layer):
    """y = sum(x^3)."""

    def call(self, x: Any) -> Any:
        return keras.ops.sum(x ** 3, axis=-1, keepdims=True)


def build_models() -> dict[str, Any]:
    x = keras.Input((3,), name="x")
    linear = keras.Model(x, keras.layers.Dense(2, name="f", kernel_initializer=keras.initializers.Constant(W),
                                               bias_initializer=keras.initializers.Constant(C))(x))
    x = keras.Input((3,), name="x")
    closed = keras.Model(x, ClosedForm(name="y")(x))
    x = keras.Input((4,), name="x")
    cubes = keras.Model(x, Cubes(name="y")(x))
    keras.utils.set_random_seed(21)
    img = keras.Input((8, 8, 2), name="image")
    feats = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu", name="features")(img)
    gap = keras.Model(img, keras.layers.Dense(4, name="scores")(keras.layers.GlobalAveragePooling2D()(feats)))
    x = keras.Input((3,), name="x")
    logits = keras.layers.Dense(4, name="logits", kernel_initializer=keras.initializers.Constant(
        np.arange(12, dtype=np.float32).reshape(3, 4) / 6 - 1))(x)
    classifier = keras.Model(x, keras.layers.Softmax(name="probs")(logits))
    ids = keras.Input((4,), dtype="int32", name="ids")
    emb = keras.layers.Embedding(10, 3, name="emb")(ids)
    h = keras.layers.Dense(5, activation="tanh", name="h")(keras.layers.Flatten()(emb))
    text = keras.Model(ids, keras.layers.Dense(1, name="y")(h))
    return {"linear": linear, "closed": closed, "cubes": cubes, "gap": gap, "classifier": classifier,
            "text": text}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return build_models()


def _serve(start_server: Any, models: dict[str, Any], **limits: Any) -> Any:
    from gradserve.server.config import EngineConfig, Limits, ServerConfig

    config = ServerConfig(engine=EngineConfig(warmup=False, xla="off"), limits=Limits(**limits))
    return start_server(config, models={name: (lambda m=model: m) for name, model in models.items()})


@pytest.fixture(scope="module")
def c(start_server: Any, models: dict[str, Any]) -> Iterator[Any]:
    srv = _serve(start_server, models)
    with gradserve.Client(srv.address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def small_chunks(start_server: Any, models: dict[str, Any]) -> Iterator[Any]:
    srv = _serve(start_server, {"closed": models["closed"], "linear": models["linear"]}, chunk_elements=7)
    with gradserve.Client(srv.address, timeout=60) as client:
        yield client


def xs(batch: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (batch, 3)).astype(np.float32)


# -- linear model: every method has a closed form ---------------------------------------------------
@pytest.mark.parametrize("t", [0, 1])
def test_linear_gradient_and_input_x_gradient(c, t):
    x = xs()
    np.testing.assert_allclose(c.gradient("linear", x, target=t), np.broadcast_to(W[:, t], x.shape), rtol=1e-6)
    np.testing.assert_allclose(c.input_x_gradient("linear", x, target=t), x * W[:, t], rtol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_linear_integrated_gradients_are_exact_for_every_quadrature(c, rule, steps):
    x = xs()
    base = np.array([0.5, -1.0, 2.0], np.float32)
    ig, delta = c.integrated_gradients("linear", x, baseline=base, steps=steps, quadrature=rule, target=1,
                                       return_delta=True)
    np.testing.assert_allclose(ig, W[:, 1] * (x - base), rtol=1e-5, atol=1e-6)
    assert np.abs(delta).max() < 1e-5


def test_linear_integrated_gradients_baseline_per_example_and_scalar(c):
    x = xs(3)
    per_example = xs(3, seed=1)
    np.testing.assert_allclose(c.integrated_gradients("linear", x, baseline=per_example, target=[0, 1, 0]),
                               W[:, [0, 1, 0]].T * (x - per_example), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c.integrated_gradients("linear", x, baseline=1.5, target=0),
                               W[:, 0] * (x - 1.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise, stdev", [(0.15, None), (0.9, None), (None, 2.0)])
def test_linear_smoothgrad_mean_square_var(c, noise, stdev):
    x = xs()
    opts = dict(samples=16, noise=noise, stdev=stdev, target=1, seed=3)
    np.testing.assert_allclose(c.smoothgrad("linear", x, kind="mean", **opts),
                               np.broadcast_to(W[:, 1], x.shape), rtol=1e-6)
    np.testing.assert_allclose(c.smoothgrad("linear", x, kind="square", **opts),
                               np.broadcast_to(W[:, 1] ** 2, x.shape), rtol=1e-6)
    np.testing.assert_array_equal(c.smoothgrad("linear", x, kind="var", **opts), 0.0)


def test_linear_jacobian_is_the_weight_matrix(c):
    x = xs(5)
    jac = c.jacobian("linear", x)
    assert jac.shape == (5, 2, 3)
    np.testing.assert_allclose(jac, np.broadcast_to(W.T, jac.shape), rtol=1e-6)


# -- closed forms of integrated gradients -----------------------------------------------------------
def test_closed_form_integrated_gradients_at_300_gauss_legendre_steps(c):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    ig, delta = c.integrated_gradients("closed", x, baseline=np.array([0.5, 1.0, 1.0], np.float32), steps=300,
                                       return_delta=True)
    np.testing.assert_allclose(ig[0], [2.5, 3.0, np.sin(3.0) - np.sin(1.0)], atol=1e-4)
    assert abs(delta[0]) < 1e-4


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_gauss_legendre_is_exact_for_sum_of_cubes(c, steps):
    x = np.random.default_rng(4).uniform(-2, 2, (3, 4)).astype(np.float32)
    base = np.random.default_rng(5).uniform(-1, 1, (3, 4)).astype(np.float32)
    ig = c.integrated_gradients("cubes", x, baseline=base, steps=steps)
    np.testing.assert_allclose(ig, x.astype(np.float64) ** 3 - base.astype(np.float64) ** 3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_trapezoid", "gausslegendre"])
def test_delta_shrinks_as_steps_grow(c, rule):
    x = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], np.float32)
    deltas = [np.abs(c.integrated_gradients("closed", x, steps=n, quadrature=rule, return_delta=True)[1]).max()
              for n in (2, 8, 32)]
    assert deltas[1] < deltas[0] and (deltas[2] < deltas[1] or deltas[2] < 1e-5)


def test_results_do_not_depend_on_chunk_size_or_batch(c, small_chunks):
    x = np.random.default_rng(6).uniform(-3, 3, (9, 3)).astype(np.float32)
    for method, opts in (("integrated_gradients", dict(steps=33)),
                         ("integrated_gradients", dict(steps=20, quadrature="riemann_trapezoid")),
                         ("smoothgrad", dict(samples=13, seed=5)),
                         ("smoothgrad", dict(samples=3, seed=5, base_method="integrated_gradients", steps=6))):
        big = getattr(c, method)("closed", x, **opts)
        tiny = getattr(small_chunks, method)("closed", x, **opts)
        np.testing.assert_allclose(tiny, big, rtol=1e-6, atol=1e-6)
        one_by_one = np.concatenate([getattr(c, method)("closed", x[i:i + 1], **opts) for i in range(len(x))])
        np.testing.assert_allclose(one_by_one, big, rtol=1e-6, atol=1e-6)


def test_smoothgrad_same_seed_is_bit_identical(c):
    x = xs(3)
    a = c.smoothgrad("closed", x, samples=10, seed=11)
    assert a.tobytes() == c.smoothgrad("closed", x, samples=10, seed=11).tobytes()
    assert not np.array_equal(a, c.smoothgrad("closed", x, samples=10, seed=12))


# -- directional derivatives ------------------------------------------------------------------------
def test_jvp_vjp_and_hvp(c, models):
    x = xs(3)
    rng = np.random.default_rng(7)
    v = rng.standard_normal((3, 3)).astype(np.float32)
    np.testing.assert_allclose(c.jvp("linear", x, v), v @ W, rtol=1e-5, atol=1e-6)
    u = rng.standard_normal((3, 2)).astype(np.float32)
    np.testing.assert_allclose(c.vjp("linear", x, u), u @ W.T, rtol=1e-5, atol=1e-6)
    # closed form: J = (5, 2 x1, cos x2), H = diag(0, 2, -sin x2)
    np.testing.assert_allclose(c.jvp("closed", x, v)[:, 0], 5 * v[:, 0] + 2 * x[:, 1] * v[:, 1]
                               + np.cos(x[:, 2]) * v[:, 2], rtol=1e-5, atol=1e-5)
    hvp = c.hvp("closed", x, v)
    np.testing.assert_allclose(hvp, np.stack([0 * v[:, 0], 2 * v[:, 1], -np.sin(x[:, 2]) * v[:, 2]], 1),
                               rtol=1e-5, atol=1e-6)
    xt, vt = tf.convert_to_tensor(x), tf.convert_to_tensor(v)
    with tf.autodiff.ForwardAccumulator(xt, vt) as acc:
        with tf.GradientTape() as tape:
            tape.watch(xt)
            total = tf.reduce_sum(models["closed"](xt))
        g = tape.gradient(total, xt)
    np.testing.assert_allclose(hvp, acc.jvp(g).numpy(), rtol=1e-6, atol=1e-6)


# -- Grad-CAM, use_logits, layer attribution -------------------------------------------------------
def test_grad_cam_on_global_average_pooling_equals_its_closed_form(c, models):
    gap = models["gap"]
    x = np.random.default_rng(8).standard_normal((2, 8, 8, 2)).astype(np.float32)
    feats = keras.Model(gap.input, gap.get_layer("features").output)(x).numpy()       # (2, 4, 4, 3)
    w = gap.get_layer("scores").get_weights()[0]
    cam = c.grad_cam("gap", x, target=[0, 2])
    expected = np.maximum(np.einsum("bhwc,bc->bhw", feats, w[:, [0, 2]].T / 16), 0)
    assert cam.shape == (2, 4, 4)
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
    big = c.grad_cam("gap", x, target=[0, 2], layer="features", upsample=True)
    assert big.shape == (2, 8, 8)
    np.testing.assert_allclose(big, tf.image.resize(expected[..., None], (8, 8))[..., 0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_use_logits_and_the_resolved_target_echo(c, models):
    x = xs(3)
    kernel = models["classifier"].get_layer("logits").get_weights()[0]
    logits = x @ kernel
    result = c.compute("classifier", "gradient", x, target="argmax", logits=True)
    np.testing.assert_array_equal(result.target_indices, logits.argmax(axis=1))
    np.testing.assert_allclose(result.attributions["x"], kernel[:, logits.argmax(axis=1)].T, rtol=1e-6)
    with pytest.raises(gradserve.FailedPrecondition, match="use_logits"):
        c.gradient("linear", x, logits=True)


def test_layer_attribution_for_integer_inputs(c, models):
    text = models["text"]
    ids = np.array([[1, 2, 3, 4], [9, 8, 7, 0]], np.int32)
    with pytest.raises(gradserve.FailedPrecondition, match="layer"):
        c.gradient("text", ids)
    ig, delta = c.integrated_gradients("text", ids, layer="emb", steps=64, return_delta=True)
    assert ig.shape == (2, 4, 3)
    f = text(ids).numpy()[:, 0] - text(np.zeros_like(ids)).numpy()[:, 0]
    np.testing.assert_allclose(ig.sum(axis=(1, 2)), f, rtol=1e-4, atol=1e-5)
    assert np.abs(delta).max() < 1e-5
    emb = keras.Model(text.input, text.get_layer("emb").output)(ids).numpy()           # (2, 4, 3)
    wh, bh = text.get_layer("h").get_weights()
    wy = text.get_layer("y").get_weights()[0][:, 0]
    h = np.tanh(emb.reshape(2, 12) @ wh + bh)
    expected = (((1 - h ** 2) * wy) @ wh.T).reshape(emb.shape)                         # dy / d emb
    np.testing.assert_allclose(c.gradient("text", ids, layer="emb"), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c.input_x_gradient("text", ids, layer="emb"), expected * emb,
                               rtol=1e-5, atol=1e-7)


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, match", [
    (lambda c, x: c.integrated_gradients("linear", x, steps=-2), gradserve.InvalidArgument, "steps"),
    (lambda c, x: c.integrated_gradients("linear", x, steps=100000), gradserve.InvalidArgument, "steps"),
    (lambda c, x: c.smoothgrad("linear", x, samples=-1), gradserve.InvalidArgument, "samples"),
    (lambda c, x: c.smoothgrad("linear", x, samples=5000), gradserve.InvalidArgument, "samples"),
    (lambda c, x: c.integrated_gradients("linear", x, baseline=np.zeros((2, 2))), gradserve.InvalidArgument,
     "baselines"),
    (lambda c, x: c.jvp("linear", x, np.zeros((4, 5))), gradserve.InvalidArgument, "tangents"),
    (lambda c, x: c.hvp("linear", x, np.zeros(2)), gradserve.InvalidArgument, "tangents"),
    (lambda c, x: c.vjp("linear", x, np.zeros((4, 3))), gradserve.InvalidArgument, "cotangent"),
    (lambda c, x: c.gradient("linear", x, layer="nope"), gradserve.NotFound, "layer"),
    (lambda c, x: c.integrated_gradients("linear", x, output="nope"), gradserve.NotFound, "output"),
    (lambda c, x: c.gradient("linear", x, target=2), gradserve.InvalidArgument, "target"),
    (lambda c, x: c.grad_cam("linear", x), gradserve.FailedPrecondition, "4-D"),
])
def test_bad_requests_name_the_field(c, call, error, match):
    with pytest.raises(error, match=match):
        call(c, xs())

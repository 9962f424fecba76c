"""Sensitivity methods on the compiled engine (no sockets), against tf.GradientTape in the test process."""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute import methods
from gradserve.server.compute.engine import CompiledModel
from gradserve.server.compute.methods.quadrature import nodes_and_weights
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve.server.core.spec import (
    ComputeSpec,
    GradCamOptions,
    IntegratedGradientsOptions,
    SmoothGradOptions,
    TargetSpec,
)
from gradserve.server.models.modelfn import from_keras

QUADRATURE = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


@pytest.fixture(scope="module")
def mlp() -> Any:
    keras.utils.set_random_seed(5)
    a = keras.Input((5,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(a)
    out = keras.layers.Dense(3, name="y")(h)
    return keras.Model(a, out)


@pytest.fixture(scope="module")
def engine(mlp: Any) -> CompiledModel:
    return CompiledModel(from_keras(mlp), EngineConfig(max_bucket=8))


@pytest.fixture(scope="module")
def classifier() -> Any:
    """Dense with a softmax activation: use_logits differentiates its linear part."""
    keras.utils.set_random_seed(6)
    a = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="tanh", name="h")(a)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(h)
    return keras.Model(a, out)


@pytest.fixture(scope="module")
def gap_cnn() -> Any:
    keras.utils.set_random_seed(7)
    a = keras.Input((6, 6, 2), name="image")
    f = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="features")(a)
    p = keras.layers.GlobalAveragePooling2D(name="gap")(f)
    return keras.Model(a, keras.layers.Dense(4, name="scores")(p))


def run(engine: CompiledModel, method: str, x: np.ndarray, target: TargetSpec | None = None,
        wrt: tuple[str, ...] | None = None, layer: str = "", limits: Limits | None = None,
        include_outputs: bool = False, **options: Any) -> dict[str, np.ndarray]:
    name = engine.model.inputs[0].name
    target = target or TargetSpec(engine.model.outputs[0].name)
    spec = spec_of(method, {name: x}, target, wrt or (name,), wrt is not None, include_outputs, layer, **options)
    return engine.run(methods.get(method).plan(spec, engine.model, limits or Limits()))


def spec_of(method: str, inputs: dict[str, np.ndarray], target: TargetSpec, wrt: tuple[str, ...],
            explicit: bool = True, include_outputs: bool = False, layer: str = "", *,
            baselines: dict[str, Any] | None = None, tangents: dict[str, np.ndarray] | None = None,
            cotangent: np.ndarray | None = None, upsample: bool = False, **options: Any) -> ComputeSpec:
    """A ComputeSpec as validation makes it: the method's typed options (already in range)."""
    ig = IntegratedGradientsOptions(**{k: options.pop(k) for k in ("steps", "quadrature", "return_delta")
                                       if k in options})
    typed: Any = None
    if method == "integrated_gradients":
        typed = ig
    elif method == "smoothgrad":
        typed = SmoothGradOptions(integrated=ig, **options)
    elif method == "grad_cam":
        typed = GradCamOptions(upsample)
    batch = len(next(iter(inputs.values())))
    return ComputeSpec("m", 1, method, inputs, batch, target, wrt, explicit, include_outputs, "", layer, typed,
                       baselines or {}, tangents or {}, cotangent)


def tape_gradient(model: Any, x: np.ndarray, column: int) -> np.ndarray:
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt)[:, column]
    return tape.gradient(y, xt).numpy()


@pytest.mark.parametrize("rule", list(QUADRATURE))
def test_integrated_gradients_match_the_quadrature_sum_of_tape_gradients(mlp, engine, rule):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    base = rng.standard_normal((5,)).astype(np.float32)
    alphas, weights = nodes_and_weights(rule, 16)
    expected = sum(w * tape_gradient(mlp, base + np.float32(a) * (x - base), 1) for a, w in zip(alphas, weights))
    expected = expected * (x - base)
    got = run(engine, "integrated_gradients", x, TargetSpec("y", "index", np.array([1, 1, 1])),
              steps=16, quadrature=rule, baselines={"x": base}, return_delta=True)
    np.testing.assert_allclose(got["attribution/x"], expected, rtol=1e-4, atol=1e-6)
    f = mlp(x).numpy()[:, 1]
    f0 = mlp(np.broadcast_to(base, x.shape)).numpy()[:, 1]
    np.testing.assert_allclose(got["extra/f_input"], f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["extra/f_baseline"], f0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["extra/delta"], expected.sum(axis=1) - (f - f0), rtol=1e-4, atol=1e-5)


def test_integrated_gradients_do_not_depend_on_chunk_size_or_batching(engine):
    x = np.random.default_rng(2).standard_normal((11, 5)).astype(np.float32)
    target = TargetSpec("y", "argmax")
    reference = run(engine, "integrated_gradients", x, target, steps=37)["attribution/x"]
    for chunk in (1, 5 * 11 * 3, 5 * 11 * 10 + 1):  # 1, 3 and 10 path points per chunk
        got = run(engine, "integrated_gradients", x, target, steps=37, limits=Limits(chunk_elements=chunk))
        np.testing.assert_allclose(got["attribution/x"], reference, rtol=1e-6, atol=1e-7)
    singles = np.concatenate([run(engine, "integrated_gradients", x[i:i + 1], target, steps=37)["attribution/x"]
                              for i in range(len(x))])
    np.testing.assert_allclose(singles, reference, rtol=1e-6, atol=1e-7)


def test_steps_and_quadrature_do_not_retrace(engine):
    x = np.ones((2, 5), np.float32)
    run(engine, "integrated_gradients", x, steps=3)
    before = sum(v for k, v in engine.trace_counts.items() if k.startswith("integrated_gradients"))
    for steps, rule in ((4, "gausslegendre"), (50, "riemann_left"), (7, "riemann_trapezoid"),
                        (300, "riemann_middle")):
        run(engine, "integrated_gradients", x, steps=steps, quadrature=rule)
    after = sum(v for k, v in engine.trace_counts.items() if k.startswith("integrated_gradients"))
    assert after == before


def smoothgrad_reference(model: Any, x: np.ndarray, samples: int, seed: int, noise: float, column: int,
                         base: str) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((samples,) + x.shape[1:]).astype(np.float32)
    sigma = (noise * (x.max(axis=1) - x.min(axis=1))).astype(np.float32)[:, None]
    grads = []
    for s in range(samples):
        xn = x + sigma * z[s]
        g = tape_gradient(model, xn, column)
        grads.append(g * xn if base == "input_x_gradient" else g)
    return np.stack(grads)


@pytest.mark.parametrize("base", ["gradient", "input_x_gradient"])
def test_smoothgrad_matches_noisy_tape_gradients(mlp, engine, base):
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    ref = smoothgrad_reference(mlp, x, 9, 42, 0.2, 2, base)
    target = TargetSpec("y", "index", np.full(4, 2))
    for kind, expected in (("mean", ref.mean(0)), ("square", (ref ** 2).mean(0)), ("var", ref.var(0))):
        got = run(engine, "smoothgrad", x, target, samples=9, seed=42, noise=0.2, aggregation=kind,
                  base_method=base)["attribution/x"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_smoothgrad_same_seed_is_bit_identical_and_independent_of_chunks_and_batching(engine):
    x = np.random.default_rng(4).standard_normal((6, 5)).astype(np.float32)
    a = run(engine, "smoothgrad", x, samples=20, seed=7)["attribution/x"]
    b = run(engine, "smoothgrad", x, samples=20, seed=7)["attribution/x"]
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, run(engine, "smoothgrad", x, samples=20, seed=8)["attribution/x"])
    fresh = [run(engine, "smoothgrad", x, samples=20)["attribution/x"] for _ in range(2)]
    assert not np.array_equal(*fresh)  # no seed: new noise every call
    chunked = run(engine, "smoothgrad", x, samples=20, seed=7, limits=Limits(chunk_elements=6 * 5 * 3))
    np.testing.assert_allclose(chunked["attribution/x"], a, rtol=1e-6, atol=1e-7)
    singles = np.concatenate([run(engine, "smoothgrad", x[i:i + 1], samples=20, seed=7)["attribution/x"]
                              for i in range(len(x))])
    np.testing.assert_allclose(singles, a, rtol=1e-6, atol=1e-7)


def test_smoothgrad_over_integrated_gradients_is_the_mean_of_noisy_ig(engine):
    x = np.random.default_rng(5).standard_normal((2, 5)).astype(np.float32)
    got = run(engine, "smoothgrad", x, samples=3, seed=1, stdev=0.3, base_method="integrated_gradients",
              steps=8)["attribution/x"]
    z = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    expected = np.mean([run(engine, "integrated_gradients", x + np.float32(0.3) * z[s], steps=8)["attribution/x"]
                        for s in range(3)], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_jacobian_jvp_vjp_hvp_match_tf_autodiff(mlp, engine):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    v = rng.standard_normal((3, 5)).astype(np.float32)
    u = rng.standard_normal((3, 3)).astype(np.float32)
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = mlp(xt)
    jac = tape.batch_jacobian(y, xt).numpy()                                   # (3, 3, 5)
    np.testing.assert_allclose(run(engine, "jacobian", x)["attribution/x"], jac, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(engine, "jvp", x, tangents={"x": v})["attribution/y"],
                               np.einsum("boi,bi->bo", jac, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(engine, "vjp", x, cotangent=u)["attribution/x"],
                               np.einsum("bo,boi->bi", u, jac), rtol=1e-5, atol=1e-6)
    with tf.autodiff.ForwardAccumulator(xt, tf.convert_to_tensor(v)) as acc:
        with tf.GradientTape() as inner:
            inner.watch(xt)
            total = tf.reduce_sum(mlp(xt)[:, 0])
        g = inner.gradient(total, xt)
    got = run(engine, "hvp", x, TargetSpec("y", "index", np.zeros(3, np.int64)), tangents={"x": v})
    np.testing.assert_allclose(got["attribution/x"], acc.jvp(g).numpy(), rtol=1e-5, atol=1e-6)


def test_float64_directional_derivatives_match_finite_differences():
    keras.utils.set_random_seed(8)
    a = keras.Input((3,), name="x", dtype="float64")
    h = keras.layers.Dense(4, activation="tanh", dtype="float64")(a)
    model = keras.Model(a, keras.layers.Dense(2, dtype="float64", name="y")(h))
    eng = CompiledModel(from_keras(model), EngineConfig(max_bucket=4))
    rng = np.random.default_rng(9)
    x, v = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    eps = 1e-5

    def f(z: np.ndarray) -> np.ndarray:
        return model(z).numpy()

    def grad(z: np.ndarray) -> np.ndarray:
        return run(eng, "gradient", z, TargetSpec("y", "index", np.ones(2, np.int64)))["attribution/x"]

    jvp = run(eng, "jvp", x, tangents={"x": v})["attribution/y"]
    np.testing.assert_allclose(jvp, (f(x + eps * v) - f(x - eps * v)) / (2 * eps), rtol=1e-7, atol=1e-9)
    hvp = run(eng, "hvp", x, TargetSpec("y", "index", np.ones(2, np.int64)), tangents={"x": v})["attribution/x"]
    assert hvp.dtype == np.float64
    np.testing.assert_allclose(hvp, (grad(x + eps * v) - grad(x - eps * v)) / (2 * eps), rtol=1e-6, atol=1e-8)
    u = rng.standard_normal((2, 2))
    vjp = run(eng, "vjp", x, cotangent=u)["attribution/x"]
    for i in range(3):  # (u . f)(x + eps e_i) differences give the i-th component of u^T J
        e = np.zeros(3)
        e[i] = eps
        fd = ((f(x + e) - f(x - e)) * u).sum(axis=1) / (2 * eps)
        np.testing.assert_allclose(vjp[:, i], fd, rtol=1e-7, atol=1e-9)


def test_use_logits_differentiates_the_linear_part(classifier):
    eng = CompiledModel(from_keras(classifier), EngineConfig(max_bucket=4))
    x = np.random.default_rng(10).standard_normal((3, 4)).astype(np.float32)
    logits_model = keras.Model(classifier.input, classifier.get_layer("h").output)
    kernel, bias = classifier.get_layer("probs").get_weights()
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = tf.matmul(logits_model(xt), kernel) + bias
        y = tf.reduce_sum(z[:, 2])
    expected = tape.gradient(y, xt).numpy()
    got = run(eng, "gradient", x, TargetSpec("probs", "index", np.full(3, 2), "identity", True),
              include_outputs=True)
    np.testing.assert_allclose(got["attribution/x"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["output/probs"], classifier(x).numpy(), rtol=1e-5, atol=1e-7)
    plain = run(eng, "gradient", x, TargetSpec("probs", "index", np.full(3, 2)))["attribution/x"]
    assert not np.allclose(plain, expected, atol=1e-3)


def test_layer_gradient_and_grad_cam_closed_form(gap_cnn):
    eng = CompiledModel(from_keras(gap_cnn), EngineConfig(max_bucket=4))
    x = np.random.default_rng(11).standard_normal((2, 6, 6, 2)).astype(np.float32)
    feats = keras.Model(gap_cnn.input, gap_cnn.get_layer("features").output)(x).numpy()   # (2, 6, 6, 3)
    w = gap_cnn.get_layer("scores").get_weights()[0]                                    # (3, 4)
    target = TargetSpec("scores", "index", np.array([1, 3]))
    cols = w[:, [1, 3]].T                                                               # (2, 3)
    grad = run(eng, "gradient", x, target, layer="features")["attribution/features"]
    np.testing.assert_allclose(grad, np.broadcast_to(cols[:, None, None, :] / 36, feats.shape), rtol=1e-5)
    cam = run(eng, "grad_cam", x, target)["attribution/features"]                        # default layer
    expected = np.maximum(np.einsum("bhwc,bc->bhw", feats, cols / 36), 0)
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)
    big = run(eng, "grad_cam", x, target, layer="features", upsample=True)["attribution/features"]
    np.testing.assert_allclose(big, cam, rtol=1e-5, atol=1e-7)  # same spatial size: resize is the identity


def test_layer_integrated_gradients_on_an_embedding_are_complete():
    keras.utils.set_random_seed(12)
    ids = keras.Input((4,), dtype="int32", name="ids")
    e = keras.layers.Embedding(10, 3, name="emb")(ids)
    h = keras.layers.Dense(5, activation="tanh")(keras.layers.Flatten()(e))
    model = keras.Model(ids, keras.layers.Dense(1, name="y")(h))
    eng = CompiledModel(from_keras(model), EngineConfig(max_bucket=4))
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 9]], np.int32)
    spec = spec_of("integrated_gradients", {"ids": x}, TargetSpec("y"), (), False, layer="emb", steps=64,
                   return_delta=True)
    got = eng.run(methods.get("integrated_gradients").plan(spec, eng.model, Limits()))
    assert got["attribution/emb"].shape == (2, 4, 3)
    f = model(x).numpy()[:, 0]
    f0 = model(np.zeros_like(x)).numpy()[:, 0]
    np.testing.assert_allclose(got["attribution/emb"].sum(axis=(1, 2)), f - f0, rtol=1e-4, atol=1e-5)
    assert np.abs(got["extra/delta"]).max() < 1e-5


@pytest.mark.parametrize("method, options, layer, error, match", [
    ("integrated_gradients", {"baselines": {"x": np.zeros(4, np.float32)}}, "", InvalidArgumentError,
     r"baselines\['x'\]"),
    ("integrated_gradients", {"baselines": {"nope": np.zeros(5, np.float32)}}, "", NotFoundError, "baselines"),
    ("integrated_gradients", {}, "no_such_layer", NotFoundError, "layer"),
    ("gradient", {}, "no_such_layer", NotFoundError, "layer"),
    ("jvp", {}, "", InvalidArgumentError, "tangents"),
    ("jvp", {"tangents": {"x": np.zeros((2, 4), np.float32)}}, "", InvalidArgumentError, r"tangents\['x'\]"),
    ("hvp", {"tangents": {"z": np.zeros((2, 5), np.float32)}}, "", NotFoundError, "tangents"),
    ("vjp", {"cotangent": np.zeros((2, 4), np.float32)}, "", InvalidArgumentError, "cotangent"),
    ("vjp", {}, "", InvalidArgumentError, "cotangent"),
    ("grad_cam", {}, "hidden", InvalidArgumentError, "4-D"),
    ("grad_cam", {}, "", FailedPreconditionError, "4-D"),
])
def test_bad_options_are_refused_before_compute(engine, method, options, layer, error, match):
    with pytest.raises(error, match=match):
        run(engine, method, np.ones((2, 5), np.float32), layer=layer, **options)


def test_use_logits_without_a_final_activation_and_oversized_jacobian(engine):
    with pytest.raises(FailedPreconditionError, match="use_logits"):
        run(engine, "gradient", np.ones((1, 5), np.float32), TargetSpec("y", use_logits=True))
    with pytest.raises(InvalidArgumentError, match="jacobian.*limit of 29"):
        run(engine, "jacobian", np.ones((2, 5), np.float32), limits=Limits(max_jacobian_elements=29))
    assert run(engine, "jacobian", np.ones((2, 5), np.float32),
               limits=Limits(max_jacobian_elements=30))["attribution/x"].shape == (2, 3, 5)


def test_sequential_model_sigmoid_logits_and_layer_gradient():
    keras.utils.set_random_seed(13)
    model = keras.Sequential([keras.Input((3,), name="x"), keras.layers.Dense(4, activation="relu", name="d1"),
                              keras.layers.Dense(2, name="d2"), keras.layers.Activation("sigmoid", name="act")])
    eng = CompiledModel(from_keras(model), EngineConfig(max_bucket=4))
    out = eng.model.outputs[0].name
    x = np.random.default_rng(14).standard_normal((3, 3)).astype(np.float32)
    w1, b1, w2, _ = model.get_weights()
    active = (x @ w1 + b1 > 0).astype(np.float32)                                       # (3, 4)
    expected = np.einsum("ij,bj->bi", w1, active * w2[:, 1])                             # d logit_1 / dx
    got = run(eng, "gradient", x, TargetSpec(out, "index", np.ones(3, np.int64), "identity", True))
    np.testing.assert_allclose(got["attribution/x"], expected, rtol=1e-5, atol=1e-6)
    layer = run(eng, "gradient", x, TargetSpec(out, "index", np.ones(3, np.int64), "identity", True), layer="d1")
    np.testing.assert_allclose(layer["attribution/d1"], np.broadcast_to(w2[:, 1], (3, 4)), rtol=1e-6)


def test_multi_input_ig_and_jvp_with_explicit_wrt():
    from gradserve.server.models.demo import build_multi

    model = build_multi()
    eng = CompiledModel(from_keras(model), EngineConfig(max_bucket=4))
    rng = np.random.default_rng(15)
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32)
    wa = model.get_layer("wa").get_weights()[0]                                          # y1 = a wa + b wb + c
    spec = spec_of("integrated_gradients", {"a": a, "b": b}, TargetSpec("y1", "index", np.array([0, 1])), ("a",),
                   steps=3, baselines={"a": 1.0})
    got = eng.run(methods.get("integrated_gradients").plan(spec, eng.model, Limits()))
    assert set(got) == {"attribution/a", "target_indices"}
    np.testing.assert_allclose(got["attribution/a"], wa[:, [0, 1]].T * (a - 1.0), rtol=1e-5, atol=1e-6)
    v = rng.standard_normal((2, 3)).astype(np.float32)
    spec = spec_of("jvp", {"a": a, "b": b}, TargetSpec("y1"), ("a",), tangents={"a": v})
    got = eng.run(methods.get("jvp").plan(spec, eng.model, Limits()))
    np.testing.assert_allclose(got["attribution/y1"], v @ wa, rtol=1e-5, atol=1e-6)
    spec = spec._replace(tangents={"a": v, "b": b})
    with pytest.raises(InvalidArgumentError, match=r"tangents\['b'\]"):
        methods.get("jvp").plan(spec, eng.model, Limits())


class CountingIdentity(keras.layers.Layer):
    """Identity that counts, at run time, how often it is called and how many rows it sees."""

    def build(self, input_shape: Any) -> None:
        self.calls = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="calls")
        self.rows = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="rows")

    def call(self, x: Any) -> Any:
        self.calls.assign_add(1)
        self.rows.assign_add(tf.shape(x)[0])
        return x


@pytest.mark.parametrize("chunk_elements, calls", [(1 << 22, 1), (4 * 5 * 10, 5), (1, 50)])
def test_integrated_gradients_evaluate_the_path_in_chunks_of_bounded_size(chunk_elements, calls):
    a = keras.Input((5,), name="x")
    counter = CountingIdentity(name="count")
    model = keras.Model(a, keras.layers.Dense(2, name="y")(counter(a)))
    eng = CompiledModel(from_keras(model), EngineConfig(max_bucket=4))
    x = np.ones((4, 5), np.float32)  # a full bucket: no padding rows
    run(eng, "integrated_gradients", x, steps=50, limits=Limits(chunk_elements=chunk_elements))  # traces
    before = (int(counter.calls.numpy()), int(counter.rows.numpy()))
    run(eng, "integrated_gradients", x, steps=50, limits=Limits(chunk_elements=chunk_elements))
    # One compiled call: `calls` model evaluations of 50 / calls path points x 4 examples each
    # (a sum target needs no extra forward pass at the input).
    assert (int(counter.calls.numpy()) - before[0], int(counter.rows.numpy()) - before[1]) == (calls, 200)

"""The compiled engine: bucket padding without retracing, warm-up, XLA selection and fallback."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute import methods
from gradserve.server.compute.compiler import warm_up
from gradserve.server.compute.engine import XLA_MARGIN, CompiledModel
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.models import TensorSpec
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, TargetSpec
from gradserve.server.models.modelfn import ModelFunction, from_keras


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3,), name="x")
    out = keras.layers.Dense(2, name="y")(keras.layers.Dense(4, activation="tanh")(inputs))
    return keras.Model(inputs, out)


def _gradient_call(model: ModelFunction, x: np.ndarray, include_outputs: bool = False):
    spec = ComputeSpec("m", 1, "gradient", {"x": x}, len(x), TargetSpec(model.outputs[0].name), ("x",),
                       False, include_outputs)
    return methods.get("gradient").plan(spec, model, Limits())


def _tape_gradient(model, x: np.ndarray) -> np.ndarray:
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = tf.reduce_sum(model(xt))
    return tape.gradient(y, xt).numpy()


def test_every_batch_size_reuses_one_trace_after_warm_up(mlp):
    engine = CompiledModel(from_keras(mlp), EngineConfig(max_bucket=8, xla="off"))
    warm_up(engine, engine.config)
    traced = dict(engine.trace_counts)
    assert len(traced) == 3 and set(traced.values()) == {1}  # predict, gradient, gradient+outputs
    rng = np.random.default_rng(0)
    for batch in range(1, 20):  # past the biggest bucket: chunks of 8
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        for outputs in (False, True):
            got = engine.run(_gradient_call(engine.model, x, outputs))
            np.testing.assert_allclose(got[ATTRIBUTION + "x"], _tape_gradient(mlp, x), rtol=1e-5, atol=1e-6)
            if outputs:
                np.testing.assert_allclose(got[OUTPUT + "y"], mlp(x).numpy(), rtol=1e-5, atol=1e-6)
    assert dict(engine.trace_counts) == traced


def test_explicit_buckets_pad_to_the_next_size(mlp):
    engine = CompiledModel(from_keras(mlp), EngineConfig(buckets=(8, 1, 3), xla="off"))
    assert engine.buckets == (1, 3, 8)
    assert [engine.bucket_for(n) for n in (1, 2, 3, 4, 8, 9)] == [1, 3, 3, 8, 8, 8]
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    got = engine.run(_gradient_call(engine.model, x))
    np.testing.assert_allclose(got[ATTRIBUTION + "x"], _tape_gradient(mlp, x), rtol=1e-5, atol=1e-6)


def test_auto_xla_measures_both_and_keeps_the_choice_without_retracing(mlp):
    engine = CompiledModel(from_keras(mlp), EngineConfig(max_bucket=4, xla="auto"))
    timings = warm_up(engine, engine.config)
    assert set(timings) == {"plain", "xla"} and all(0 < t < float("inf") for t in timings.values())
    assert engine.xla == (timings["xla"] < XLA_MARGIN * timings["plain"])
    traced = dict(engine.trace_counts)
    x = np.random.default_rng(2).standard_normal((3, 3)).astype(np.float32)
    got = engine.run(_gradient_call(engine.model, x))
    np.testing.assert_allclose(got[ATTRIBUTION + "x"], _tape_gradient(mlp, x), rtol=1e-5, atol=1e-6)
    assert dict(engine.trace_counts) == traced
    if engine.xla:  # one XLA compilation per padded shape seen
        assert sum(engine.compile_counts.values()) >= 1


def _no_xla_model() -> ModelFunction:
    """y = 2x, with a string round trip XLA has no kernel for (AsString)."""
    def call(feed):
        x = feed["x"]
        text = tf.strings.as_string(x)
        return {"y": 2.0 * x + 0.0 * tf.stop_gradient(tf.strings.to_number(text))}
    spec = TensorSpec("x", np.dtype(np.float32), (None, 3))
    return ModelFunction((spec,), (TensorSpec("y", np.dtype(np.float32), (None, 3)),), call)


def test_auto_xla_falls_back_when_xla_cannot_compile():
    engine = CompiledModel(_no_xla_model(), EngineConfig(max_bucket=4, xla="auto"))
    timings = warm_up(engine, engine.config)
    assert timings["xla"] == float("inf") and not engine.xla
    got = engine.run(_gradient_call(engine.model, np.ones((2, 3), np.float32)))
    np.testing.assert_array_equal(got[ATTRIBUTION + "x"], np.full((2, 3), 2.0, np.float32))


def test_xla_on_falls_back_per_function_on_an_unsupported_op():
    engine = CompiledModel(_no_xla_model(), EngineConfig(max_bucket=4, xla="on"), xla=True)
    got = engine.run(_gradient_call(engine.model, np.ones((3, 3), np.float32), include_outputs=True))
    np.testing.assert_array_equal(got[ATTRIBUTION + "x"], np.full((3, 3), 2.0, np.float32))
    np.testing.assert_array_equal(got[OUTPUT + "y"], np.full((3, 3), 2.0, np.float32))
    # The fallback is remembered: the next call goes straight to the plain function, and no
    # XLA compilation is reported for it.
    traced = dict(engine.trace_counts)
    engine.run(_gradient_call(engine.model, np.ones((1, 3), np.float32), include_outputs=True))
    assert dict(engine.trace_counts) == traced
    assert not engine.compile_counts



def test_warm_up_skips_the_gradient_of_an_integer_first_output():
    from gradserve.server.compute.compiler import Compiler
    from gradserve.server.config import ServerConfig
    from gradserve.server.core.models import ModelState
    from gradserve.server.models.repository import ModelRepository

    def call(feed):
        x = feed["x"]
        return {"label": tf.argmax(x, axis=1), "score": tf.reduce_max(x, axis=1)}

    fn = ModelFunction((TensorSpec("x", np.dtype(np.float32), (None, 3)),),
                       (TensorSpec("label", np.dtype(np.int64), (None,)),
                        TensorSpec("score", np.dtype(np.float32), (None,))), call)
    cfg = ServerConfig(engine=EngineConfig(max_bucket=2, xla="off"))
    repo = ModelRepository(cfg, Compiler(cfg.engine))
    mv = repo.load("argmax", 1, "test", lambda: fn)
    assert mv.state is ModelState.READY, mv.message
    assert list(mv.engine.trace_counts) == ["predict"]

"""The compiled engine's predict and gradient against tf.GradientTape in the test process."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute import methods
from gradserve.server.compute.engine import CompiledModel
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, TargetSpec
from gradserve.server.models.modelfn import from_keras


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5,), name="x")
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    h = keras.layers.Dense(8, activation="softplus")(h)
    out = keras.layers.Dense(3, name="y")(h)
    return keras.Model(inputs, out)


@pytest.fixture(scope="module")
def engine(mlp):
    return CompiledModel(from_keras(mlp), EngineConfig(max_bucket=8))


def _gradient(engine, x, target, include_outputs=False):
    spec = ComputeSpec("m", 1, "gradient", {"x": x}, len(x), target, ("x",), True, include_outputs)
    return engine.run(methods.get("gradient").plan(spec, engine.model, Limits()))


@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_gradient_of_sum_matches_gradient_tape(mlp, engine, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 5)).astype(np.float32)
    result = _gradient(engine, x, TargetSpec("y"), include_outputs=True)
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = mlp(xt)
        total = tf.reduce_sum(y)
    np.testing.assert_allclose(result[ATTRIBUTION + "x"], tape.gradient(total, xt).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result[OUTPUT + "y"], y.numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_of_one_index_per_example(mlp, engine):
    x = np.random.default_rng(7).standard_normal((4, 5)).astype(np.float32)
    idx = np.array([0, 2, 1, 2], np.int64)
    result = _gradient(engine, x, TargetSpec("y", "index", idx))
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        picked = tf.gather(mlp(xt), idx, axis=1, batch_dims=1)
    np.testing.assert_allclose(result[ATTRIBUTION + "x"], tape.gradient(picked, xt).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result["target_indices"], idx)


def test_predict_pads_and_chunks_without_changing_values(mlp, engine):
    x = np.random.default_rng(1).standard_normal((19, 5)).astype(np.float32)
    spec = ComputeSpec("m", 1, "predict", {"x": x}, len(x))
    out = engine.run(methods.get("predict").plan(spec, engine.model, Limits()))
    np.testing.assert_allclose(out[OUTPUT + "y"], mlp(x).numpy(), rtol=1e-5, atol=1e-6)


def test_one_trace_serves_every_batch_size(engine):
    _gradient(engine, np.ones((1, 5), np.float32), TargetSpec("y"))
    before = dict(engine.trace_counts)
    assert sum(before.values()) >= 1
    for batch in range(1, 20):
        _gradient(engine, np.ones((batch, 5), np.float32), TargetSpec("y"))
    assert dict(engine.trace_counts) == before


@pytest.mark.parametrize("xla", [False, True])
def test_large_batches_run_several_buckets_per_call_and_match_gradient_tape(mlp, xla):
    engine = CompiledModel(from_keras(mlp), EngineConfig(max_bucket=8), xla=xla)
    _gradient(engine, np.ones((1, 5), np.float32), TargetSpec("y"))
    traces = dict(engine.trace_counts)
    x = np.random.default_rng(11).standard_normal((300, 5)).astype(np.float32)
    result = _gradient(engine, x, TargetSpec("y"))
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(mlp(xt))
    np.testing.assert_allclose(result[ATTRIBUTION + "x"], tape.gradient(total, xt).numpy(), rtol=1e-5, atol=1e-6)
    assert dict(engine.trace_counts) == traces
    if xla:  # one shape per bucket used plus the one full step (128 rows), never one per batch
        assert sum(engine.compile_counts.values()) <= len(engine.buckets) + 1

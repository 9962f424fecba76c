"""The engine's LiteRT backend: which functions and batch sizes it takes, that its answers are
TensorFlow's (closed forms and a tape in this process), and where it falls back to TensorFlow."""
from __future__ import annotations

import ai_edge_litert  # noqa: F401 - a missing backend must fail, not skip
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute import (
    litert,
    methods,
)
from gradserve.server.compute.batcher import merge_calls, split_result
from gradserve.server.compute.compiler import warm_up
from gradserve.server.compute.engine import CompiledModel, _on_cpu
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import CancelledError
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, TargetSpec
from gradserve.server.models import demo
from gradserve.server.models.modelfn import ModelFunction, from_keras
from gradserve.server.process.cli import build_parser


def _call(model: ModelFunction, inputs: dict[str, np.ndarray], method: str = "gradient",
          include_outputs: bool = False, output: str | None = None):
    rows = len(next(iter(inputs.values())))
    if method == "predict":
        spec = ComputeSpec(model="m", version=1, method="predict", inputs=inputs, batch_size=rows)
    else:
        spec = ComputeSpec(model="m", version=1, method=method, inputs=inputs, batch_size=rows,
                           target=TargetSpec(output or model.outputs[0].name), wrt=tuple(sorted(inputs)),
                           include_outputs=include_outputs)
    return methods.get(method).plan(spec, model, Limits())


def _engine(build, backend: str = "litert", **config) -> CompiledModel:
    cfg = EngineConfig(xla="off", backend=backend, **config)
    engine = CompiledModel(from_keras(build()), cfg)
    warm_up(engine, cfg)
    return engine


def _tape(model, x: dict[str, np.ndarray], output: str | None = None):
    xt = {k: tf.constant(v) for k, v in x.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(xt.values()))
        y = model(xt if len(xt) > 1 else next(iter(xt.values())))
        if isinstance(y, dict):
            y = y[output]
        total = tf.reduce_sum(y)
    return {k: g.numpy() for k, g in zip(xt, tape.gradient(total, list(xt.values())))}, y.numpy()


@pytest.fixture(scope="module")
def dense2() -> CompiledModel:
    return _engine(demo.build_dense2, max_bucket=8)


def test_dense2_runs_in_litert_with_the_closed_form_answers(dense2):
    summary = dense2.backend_summary()
    assert set(summary) == set(dense2.trace_counts)  # predict, gradient, gradient + outputs
    assert all(v == "litert (batch 1-8)" for v in summary.values()), summary
    rng = np.random.default_rng(0)
    for rows in (1, 3, 8, 13):  # 13: two chunks, 8 and 5 padded to 8
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        got = dense2.run(_call(dense2.model, {"input": x}, include_outputs=True))
        np.testing.assert_allclose(got[ATTRIBUTION + "input"], 0.5, rtol=1e-6)
        np.testing.assert_allclose(got[OUTPUT + "alpha"][:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-6)
        assert got[ATTRIBUTION + "input"].shape == (rows, 4) and got[ATTRIBUTION + "input"].dtype == np.float32
        y = dense2.run(_call(dense2.model, {"input": x}, method="predict"))[OUTPUT + "alpha"]
        np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-6)
    # Sizes first met after warm-up were tried then, without a retrace.
    assert set(dense2.backends["predict"]) == {1, 4, 8}
    assert all(v == "litert" for v in dense2.backends["predict"].values())
    assert set(dense2.trace_counts.values()) == {1}


def test_relu_gradients_are_rewritten_and_match_the_tape():
    # cnn: conv -> relu twice; its gradient graph has ReluGrad, which TFLite has no kernel for.
    engine = _engine(demo.build_cnn, max_bucket=4)
    assert all(v.startswith("litert") for v in engine.backend_summary().values()), engine.backend_summary()
    keras_model = engine.model.keras_model
    x = np.random.default_rng(1).standard_normal((3, 16, 16, 1)).astype(np.float32)
    x[0] = 0.0  # relu features at exactly 0 (the bias decides) and below: the mask must match TF's
    got = engine.run(_call(engine.model, {"image": x}, include_outputs=True))
    want, y = _tape(keras_model, {"image": x})
    np.testing.assert_allclose(got[ATTRIBUTION + "image"], want["image"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[OUTPUT + "probs"], y, rtol=1e-5, atol=1e-7)
    ixg = engine.run(_call(engine.model, {"image": x}, method="input_x_gradient"))[ATTRIBUTION + "image"]
    np.testing.assert_allclose(ixg, x * want["image"], rtol=1e-4, atol=1e-7)


def test_a_function_litert_cannot_convert_stays_on_tensorflow():
    # multi's gradient needs BroadcastGradientArgs over a free batch dimension: no TFLite kernel.
    engine = _engine(demo.build_multi, max_bucket=4)
    summary = engine.backend_summary()
    assert summary["predict"] == "litert (batch 1-4)"
    gradients = [v for k, v in summary.items() if k.startswith("gradient")]
    assert gradients and all(v == "tensorflow (batch 1-4)" for v in gradients), summary
    rng = np.random.default_rng(2)
    x = {"a": rng.standard_normal((3, 3)).astype(np.float32), "b": rng.standard_normal((3, 2)).astype(np.float32)}
    got = engine.run(_call(engine.model, x, output="y1"))
    want, _ = _tape(engine.model.keras_model, x, "y1")
    for k in x:
        np.testing.assert_allclose(got[ATTRIBUTION + k], want[k], rtol=1e-5, atol=1e-6)


def test_runs_in_litert_says_which_calls_take_the_interpreter(dense2):
    x = np.ones((3, 4), np.float32)
    dense2.run(_call(dense2.model, {"input": x}))  # bucket 4 has been tried
    assert dense2.runs_in_litert(_call(dense2.model, {"input": x}))
    assert not dense2.runs_in_litert(_call(dense2.model, {"input": np.ones((20, 4), np.float32)}))  # 3 chunks
    multi = CompiledModel(from_keras(demo.build_multi()), EngineConfig(xla="off", backend="litert", max_bucket=2))
    xm = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 2), np.float32)}
    assert not multi.runs_in_litert(_call(multi.model, xm, method="predict"))  # not tried yet
    multi.run(_call(multi.model, xm, method="predict"))
    assert multi.runs_in_litert(_call(multi.model, xm, method="predict"))
    multi.run(_call(multi.model, xm, output="y1"))
    assert not multi.runs_in_litert(_call(multi.model, xm, output="y1"))  # its gradient cannot convert


def test_backend_tensorflow_never_uses_litert():
    engine = _engine(demo.build_dense2, backend="tensorflow", max_bucket=4)
    x = np.ones((3, 4), np.float32)
    got = engine.run(_call(engine.model, {"input": x}))
    np.testing.assert_array_equal(got[ATTRIBUTION + "input"], np.full((3, 4), 0.5, np.float32))
    assert engine.backends == {} and engine.backend_summary() == {}
    assert not engine.runs_in_litert(_call(engine.model, {"input": x}))


def test_chunks_bigger_than_the_biggest_bucket_run_in_tensorflow(dense2):
    # Gradients of large batches run up to 16 biggest buckets per call: those stay on TF.
    x = np.random.default_rng(3).standard_normal((128, 4)).astype(np.float32)
    got = dense2.run(_call(dense2.model, {"input": x}, include_outputs=True))
    np.testing.assert_allclose(got[ATTRIBUTION + "input"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(got[OUTPUT + "alpha"][:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-5)
    assert all(size <= 8 for sizes in dense2.backends.values() for size in sizes)


def test_merged_answers_equal_unmerged_ones_in_litert(dense2):
    rng = np.random.default_rng(4)
    calls = [_call(dense2.model, {"input": rng.standard_normal((n, 4)).astype(np.float32)}, include_outputs=True)
             for n in (1, 2, 3)]
    merged = split_result(dense2.run(merge_calls(calls)), [c.batch_size for c in calls])
    for call, part in zip(calls, merged):  # bucket 8 merged, buckets 1, 2 and 4 alone: the same bits
        alone = dense2.run(call)
        for k in alone:
            np.testing.assert_array_equal(part[k], alone[k])


def test_a_cancelled_call_stops_before_its_litert_chunk(dense2):
    call = _call(dense2.model, {"input": np.ones((2, 4), np.float32)})
    call.control = CallControl()
    call.control.cancelled.set()
    with pytest.raises(CancelledError):
        dense2.run(call)


def test_litert_is_only_for_the_cpu():
    assert _on_cpu("/CPU:0") and _on_cpu("/job:localhost/device:CPU:0")
    assert not _on_cpu("/GPU:0") and not _on_cpu("/device:GPU:1")
    engine = CompiledModel(from_keras(demo.build_dense2()), EngineConfig(device="/GPU:0", backend="litert"))
    assert not engine._lite_ok


def test_reproduces_states_its_tolerance():
    want = {"a": np.array([1.0, -2.0, 1000.0], np.float32), "i": np.array([3, 4])}
    assert litert.reproduces({"a": want["a"] * (1 + 5e-6), "i": want["i"].copy()}, want) == ""
    assert "differs" in litert.reproduces({"a": want["a"] + np.float32(0.01), "i": want["i"]}, want)
    assert litert.reproduces({"a": want["a"], "i": np.array([3, 5])}, want) == "i: values differ"
    assert "NaN" in litert.reproduces({"a": np.array([1.0, np.nan, 1000.0], np.float32), "i": want["i"]}, want)
    assert "float64" in litert.reproduces({"a": want["a"].astype(np.float64), "i": want["i"]}, want)
    assert "outputs" in litert.reproduces({"a": want["a"]}, want)


def test_the_backend_flag():
    assert build_parser().parse_args(["serve"]).backend == "auto"
    assert build_parser().parse_args(["serve", "--backend", "tensorflow"]).backend == "tensorflow"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--backend", "onnx"])

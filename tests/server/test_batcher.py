"""DynamicBatcher on a real compiled engine: merging, exact splitting, queue bound, deadlines.

Requests are submitted within one event-loop turn, so the batcher's order of events is fixed:
the first request finds the engine idle and runs alone, the rest queue while it runs and are
merged into the next call. The batcher's counters prove how many engine calls were made.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradserve.server.compute import methods
from gradserve.server.compute.batcher import DynamicBatcher
from gradserve.server.compute.engine import CompiledModel
from gradserve.server.config import BatchingConfig, EngineConfig, Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, PreparedCall, TargetSpec
from gradserve.server.models.modelfn import from_keras


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,), name="x")
    h = keras.layers.Dense(12, activation="tanh")(inputs)
    out = keras.layers.Dense(3, name="y")(h)
    return keras.Model(inputs, out)


@pytest.fixture(scope="module")
def engine(mlp):
    return CompiledModel(from_keras(mlp), EngineConfig(max_bucket=16))


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        yield ex


def _grad_call(engine, x, target=None, include_outputs=True):
    spec = ComputeSpec("m", 1, "gradient", {"x": x}, len(x), target or TargetSpec("y"), ("x",), True,
                       include_outputs)
    return methods.get("gradient").plan(spec, engine.model, Limits())


def _predict_call(engine, x):
    return methods.get("predict").plan(ComputeSpec("m", 1, "predict", {"x": x}, len(x)), engine.model, Limits())


def _run(coro):
    return asyncio.run(coro)


def _batcher(engine, pool, **cfg):
    return DynamicBatcher(engine.run, pool, BatchingConfig(**cfg), max_inflight=1)


def test_concurrent_requests_of_different_sizes_are_merged_and_split_exactly(mlp, engine, pool):
    rng = np.random.default_rng(0)
    sizes = [1, 3, 2, 5, 1, 4]
    xs = [rng.standard_normal((n, 5)).astype(np.float32) for n in sizes]
    idx = [rng.integers(0, 3, n) for n in sizes]
    calls = [_grad_call(engine, x, TargetSpec("y", "index", i)) for x, i in zip(xs, idx)]
    expected = [engine.run(_grad_call(engine, x, TargetSpec("y", "index", i))) for x, i in zip(xs, idx)]
    batcher = _batcher(engine, pool, max_batch_size=16, max_delay_us=0)

    async def main():
        return await asyncio.gather(*(batcher.submit(c) for c in calls))

    results = _run(main())
    # The first ran alone on the idle engine; the other five were merged into one call.
    assert batcher.stats.engine_calls == 2
    assert batcher.stats.max_merged == len(sizes) - 1
    assert batcher.stats.rows_run == sum(sizes)
    for x, i, got, want in zip(xs, idx, results, expected):
        np.testing.assert_allclose(got[ATTRIBUTION + "x"], want[ATTRIBUTION + "x"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[OUTPUT + "y"], want[OUTPUT + "y"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got["target_indices"], i)
        # And against tf.GradientTape in the test process.
        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            picked = tf.gather(mlp(xt), i, axis=1, batch_dims=1)
        np.testing.assert_allclose(got[ATTRIBUTION + "x"], tape.gradient(picked, xt).numpy(), rtol=1e-5, atol=1e-6)


def test_merged_batch_respects_max_batch_size(engine, pool):
    x = np.ones((3, 5), np.float32)
    batcher = _batcher(engine, pool, max_batch_size=6, max_delay_us=0)

    async def main():
        return await asyncio.gather(*(batcher.submit(_predict_call(engine, x)) for _ in range(5)))

    results = _run(main())
    # 1 alone, then 2 + 2 of three rows each (6 rows at most per call).
    assert batcher.stats.engine_calls == 3
    assert batcher.stats.max_merged == 2
    assert all(r[OUTPUT + "y"].shape == (3, 3) for r in results)


def test_incompatible_calls_are_not_merged_and_each_gets_its_own_answer(engine, pool):
    x = np.full((2, 5), 0.25, np.float32)
    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0)
    calls = [_predict_call(engine, x), _grad_call(engine, x), _predict_call(engine, x), _grad_call(engine, x),
             _grad_call(engine, x, include_outputs=False)]

    async def main():
        return await asyncio.gather(*(batcher.submit(c) for c in calls))

    results = _run(main())
    # predict alone (idle), then the two gradients+outputs, the other predict, the gradient alone.
    assert batcher.stats.engine_calls == 4
    assert set(results[0]) == {OUTPUT + "y"} and set(results[2]) == {OUTPUT + "y"}
    assert ATTRIBUTION + "x" in results[1] and OUTPUT + "y" in results[3]
    assert OUTPUT + "y" not in results[4]


def test_calls_merge_only_when_shared_arrays_are_equal(engine, pool):
    x = np.ones((1, 5), np.float32)

    def call(scale: float) -> PreparedCall:
        base = _predict_call(engine, x)
        return PreparedCall(base.key, base.batched, {"scale": np.array([scale], np.float32)})

    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0)

    async def main():
        return await asyncio.gather(*(batcher.submit(c) for c in [call(1.0), call(1.0), call(2.0), call(1.0)]))

    _run(main())
    # First alone; then the two with scale 1.0 together and the one with 2.0 apart.
    assert batcher.stats.engine_calls == 3


def test_merged_results_are_split_back_by_rows(engine, pool):
    xs = [np.full((n, 5), float(n), np.float32) for n in (2, 3, 4, 5)]
    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0)

    async def main():
        return await asyncio.gather(*(batcher.submit(_predict_call(engine, x)) for x in xs))

    results = _run(main())
    assert batcher.stats.max_merged == 3
    for x, r in zip(xs, results):
        np.testing.assert_array_equal(r[OUTPUT + "y"], engine.run(_predict_call(engine, x))[OUTPUT + "y"])


def test_full_queue_is_resource_exhausted(engine, pool):
    x = np.ones((1, 5), np.float32)
    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0, max_queue=2)

    async def main():
        return await asyncio.gather(*(batcher.submit(_predict_call(engine, x)) for _ in range(5)),
                                    return_exceptions=True)

    results = _run(main())
    # One runs at once (idle), two wait, the queue is then full.
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 2 and all(isinstance(e, ResourceExhaustedError) for e in errors)
    assert "queue" in str(errors[0])
    assert batcher.stats.rejected == 2 and batcher.stats.requests_run == 3


def test_expired_requests_are_not_computed(engine, pool):
    x = np.ones((1, 5), np.float32)
    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0)
    past = time.monotonic() - 1.0
    future = time.monotonic() + 60.0

    def call(deadline: float) -> Any:
        prepared = _predict_call(engine, x)
        prepared.control = CallControl(deadline)
        return prepared

    async def main():
        return await asyncio.gather(
            batcher.submit(call(past)),      # expired before it is queued
            batcher.submit(call(future)),    # runs alone
            batcher.submit(call(past)),      # expired while queued
            batcher.submit(call(future)),    # runs in the second call
            return_exceptions=True)

    results = _run(main())
    assert isinstance(results[0], DeadlineExceededError) and isinstance(results[2], DeadlineExceededError)
    assert not isinstance(results[1], BaseException) and not isinstance(results[3], BaseException)
    assert batcher.stats.expired == 2
    assert batcher.stats.engine_calls == 2 and batcher.stats.requests_run == 2


def test_requests_arriving_at_a_busy_model_are_held_together_and_an_idle_one_is_not(engine, pool):
    x = np.ones((1, 5), np.float32)
    batcher = DynamicBatcher(engine.run, pool, BatchingConfig(max_batch_size=64, max_delay_us=200_000),
                             max_inflight=2)

    async def main():
        await batcher.submit(_predict_call(engine, x))  # idle: runs at once, alone
        assert batcher.stats.engine_calls == 1
        await asyncio.gather(*(batcher.submit(_predict_call(engine, x)) for _ in range(4)))

    _run(main())
    # The first of the four found the model idle and ran alone; the other three arrived while it
    # was busy and were held together (a second slot was free: without the hold the second
    # would have gone alone at once, making four calls with at most two merged).
    assert batcher.stats.engine_calls == 3
    assert batcher.stats.max_merged == 3


def test_close_fails_queued_requests_and_a_shut_down_pool_does_not_hang(engine):
    x = np.ones((1, 5), np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    batcher = _batcher(engine, pool, max_batch_size=64, max_delay_us=0)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(_predict_call(engine, x))) for _ in range(3)]
        await asyncio.sleep(0)  # all three submitted: one running, two queued
        batcher.close()
        first = await asyncio.gather(*tasks, return_exceptions=True)
        pool.shutdown(wait=True)
        late = await asyncio.gather(batcher.submit(_predict_call(engine, x)), return_exceptions=True)
        return first, late

    first, late = _run(main())
    assert not isinstance(first[0], BaseException)
    assert all(isinstance(r, UnavailableError) for r in first[1:])
    assert isinstance(late[0], UnavailableError)


def test_runner_applies_per_model_overrides(engine):
    from gradserve.server.compute.runner import ComputeRunner
    from gradserve.server.core.models import ModelState
    from gradserve.server.models.repository import ModelVersion

    # inline_max_us=0: no call is computed on the loop, however cheap it measured, so that the
    # counts below are the batcher's.
    runner = ComputeRunner(1, BatchingConfig(max_batch_size=8, inline_max_us=0),
                           {"plain": BatchingConfig(enabled=False)})
    batched = ModelVersion("m", 1, "test", ModelState.READY, engine=engine)
    plain = ModelVersion("plain", 1, "test", ModelState.READY, engine=engine)
    x = np.full((2, 5), 0.5, np.float32)

    async def main():
        a = await asyncio.gather(*(runner.run(batched, _predict_call(engine, x)) for _ in range(3)))
        b = await asyncio.gather(*(runner.run(plain, _predict_call(engine, x)) for _ in range(3)))
        return a, b

    try:
        a, b = _run(main())
    finally:
        runner.close()
    want = engine.run(_predict_call(engine, x))[OUTPUT + "y"]
    for r in a + b:
        np.testing.assert_allclose(r[OUTPUT + "y"], want, atol=1e-6)
    assert runner.config_for("m").max_batch_size == 8 and not runner.config_for("plain").enabled
    assert runner.batcher(batched).stats.requests_run == 3  # went through the batcher
    assert runner.batcher(batched).stats.engine_calls == 2
    assert runner.batcher(plain).stats.submitted == 0  # batching off: straight to the threads


def test_runner_forgets_the_batcher_of_an_unloading_version(engine):
    from gradserve.server.compute.runner import ComputeRunner
    from gradserve.server.core.models import ModelState
    from gradserve.server.models.repository import ModelVersion

    runner = ComputeRunner(1)
    mv = ModelVersion("m", 1, "test", ModelState.READY, engine=engine)
    x = np.ones((1, 5), np.float32)
    try:
        _run(runner.run(mv, _predict_call(engine, x)))
        assert runner.batcher_stats()[("m", 1)].requests_run == 1
        runner.forget(mv)  # still READY: kept
        assert ("m", 1) in runner.batcher_stats()
        mv.state = ModelState.UNLOADING
        runner.forget(mv)
        assert runner.batcher_stats() == {}
        # A request that picked the version before it began unloading still completes, and
        # does not bring the batcher back.
        result = _run(runner.run(mv, _predict_call(engine, x)))
        assert result[OUTPUT + "y"].shape == (1, 3)
        assert runner.batcher_stats() == {}
    finally:
        runner.close()


@pytest.mark.parametrize("inline_max_us", [0, 10 ** 9])
def test_runner_runs_cheap_calls_inline_when_allowed_even_behind_a_running_call(engine, inline_max_us):
    from gradserve.server.compute.runner import ComputeRunner
    from gradserve.server.core.models import ModelState
    from gradserve.server.models.repository import ModelVersion

    runner = ComputeRunner(1, BatchingConfig(inline_max_us=inline_max_us))
    mv = ModelVersion("m", 1, "test", ModelState.READY, engine=engine)
    xs = [np.full((1, 5), float(i), np.float32) for i in range(4)]

    async def one_by_one():
        return [await runner.run(mv, _predict_call(engine, x)) for x in xs]

    async def behind_a_running_call():
        # A call of a kind never timed goes to a thread: the model is busy while it runs.
        first = runner.run(mv, _predict_call(engine, np.ones((2, 5), np.float32)))
        return (await asyncio.gather(first, *(runner.run(mv, _predict_call(engine, x)) for x in xs)))[1:]

    try:
        alone = _run(one_by_one())
        # The first call of its kind is timed on a compute thread; with inlining allowed the
        # next ones (the model idle, the call measured cheap enough) run on the loop itself.
        assert runner.batcher(mv).stats.submitted == (4 if inline_max_us == 0 else 1)
        merged = _run(behind_a_running_call())
        # The model is busy with a call on a thread: without inlining the requests queue and
        # merge; cheap ones run on the loop all the same (only the new kind goes to a thread).
        assert runner.batcher(mv).stats.submitted == (9 if inline_max_us == 0 else 2)
    finally:
        runner.close()
    for x, a, m in zip(xs, alone, merged):
        want = engine.run(_predict_call(engine, x))[OUTPUT + "y"]
        np.testing.assert_array_equal(a[OUTPUT + "y"], want)
        np.testing.assert_allclose(m[OUTPUT + "y"], want, rtol=1e-6, atol=1e-6)

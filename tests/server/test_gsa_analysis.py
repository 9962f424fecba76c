"""server/gsa without sockets: our samples and indices equal SALib's on the same samples, DGSM
equals the mean squared gradient of a tape in this process, chunking never changes the answer,
and an analysis stops between chunks when its caller goes away."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from SALib.analyze import morris as salib_morris
from SALib.analyze import sobol as salib_sobol
from SALib.sample import morris as morris_sampler
from SALib.sample import sobol as sobol_sampler

from gradserve.server.compute.compiler import Compiler
from gradserve.server.config import EngineConfig, Limits, ServerConfig
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import CancelledError, FailedPreconditionError
from gradserve.server.core.models import TensorSpec
from gradserve.server.dataplane.gsa import analysis, sampling
from gradserve.server.dataplane.gsa.problem import check
from gradserve.server.dataplane.gsa.run import run_analysis
from gradserve.server.frontends.gsa import analysis_request
from gradserve.server.models.modelfn import ModelFunction
from gradserve.server.models.repository import ModelRepository, ModelVersion
from gradserve.v1 import global_sensitivity_service_pb2 as pb

PI = float(np.pi)


def ishigami_np(x: np.ndarray, a: float = 7.0, b: float = 0.1) -> np.ndarray:
    return np.sin(x[:, 0]) + a * np.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * np.sin(x[:, 0])


def ishigami_tf(x: tf.Tensor) -> tf.Tensor:
    return (tf.sin(x[:, 0]) + 7.0 * tf.sin(x[:, 1]) ** 2 + 0.1 * x[:, 2] ** 4 * tf.sin(x[:, 0]))[:, None]


@pytest.fixture(scope="module")
def ishigami() -> ModelVersion:
    model = ModelFunction((TensorSpec("x", np.dtype(np.float64), (None, 3)),),
                          (TensorSpec("y", np.dtype(np.float64), (None, 1)),),
                          lambda feed: {"y": ishigami_tf(feed["x"])})
    cfg = ServerConfig(engine=EngineConfig(xla="off", warmup=False, max_bucket=64))
    repo = ModelRepository(cfg, Compiler(cfg.engine))
    return repo.load("ishigami", 1, "test", lambda: model)


def request(method: int, samples: int, seed: int = 7, **kw: Any) -> pb.AnalyzeRequest:
    factors = [pb.Factor(index=i, params=[-PI, PI]) for i in range(3)]
    return pb.AnalyzeRequest(model="ishigami", method=method, factors=factors, samples=samples, seed=seed, **kw)


def parse(req: pb.AnalyzeRequest, model: ModelFunction, limits: Limits) -> Any:
    """The wire request through the front-end's parse and the data plane's check."""
    return check(analysis_request(req), model, limits)


def direct(mv: ModelVersion, calls: list[int] | None = None) -> Any:
    async def run(version: ModelVersion, call: Any) -> dict[str, np.ndarray]:
        if calls is not None:
            calls.append(call.batch_size)
        assert version.engine is not None
        return version.engine.run(call)
    return run


@pytest.mark.parametrize("second_order", [False, True])
def test_sobol_equals_salib_on_the_same_samples(ishigami: ModelVersion, second_order: bool) -> None:
    req = request(pb.ANALYSIS_METHOD_SOBOL, 512, sobol=pb.SobolOptions(second_order=second_order))
    a = parse(req, ishigami.model, Limits())
    seeds = sampling.seeds_for(a)
    x = sampling.draw(a, seeds)
    problem = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-PI, PI]] * 3}
    want_x = sobol_sampler.sample(problem, 512, calc_second_order=second_order, scramble=True,
                                  seed=sampling.Seeds(7).sampler)
    np.testing.assert_array_equal(x, want_x)   # the same samples, bit for bit
    y = ishigami_np(x)
    ours = analysis.sobol_indices(a, y, seeds.bootstrap)
    theirs = salib_sobol.analyze(problem, y, calc_second_order=second_order, seed=seeds.bootstrap)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    assert ("S2" in ours) == second_order


def test_morris_equals_salib_on_the_same_samples(ishigami: ModelVersion) -> None:
    a = parse(request(pb.ANALYSIS_METHOD_MORRIS, 20, morris=pb.MorrisOptions(levels=6)), ishigami.model,
                      Limits())
    seeds = sampling.seeds_for(a)
    x = sampling.draw(a, seeds)
    problem = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-PI, PI]] * 3}
    np.testing.assert_array_equal(x, morris_sampler.sample(problem, 20, num_levels=6, seed=sampling.Seeds(7).sampler))
    y = ishigami_np(x)
    ours = analysis.morris_measures(a, x, y, seeds.bootstrap)
    theirs = salib_morris.analyze(problem, x, y, num_levels=6, seed=seeds.bootstrap)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_dgsm_is_the_mean_squared_gradient_of_a_tape(ishigami: ModelVersion) -> None:
    a = parse(request(pb.ANALYSIS_METHOD_DGSM, 300), ishigami.model, Limits())
    indices, y = asyncio.run(run_analysis(a, ishigami, direct(ishigami), Limits()))
    x = tf.constant(sampling.draw(a, sampling.seeds_for(a)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = ishigami_tf(x)
    g = tape.gradient(out, x).numpy()
    np.testing.assert_allclose(indices["vi"], (g ** 2).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(indices["vi_std"], (g ** 2).std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(y, out.numpy()[:, 0], rtol=1e-12)
    np.testing.assert_allclose(indices["dgsm"], (g ** 2).mean(axis=0) * 4 / np.var(y), rtol=1e-12)
    assert np.all(indices["dgsm_conf"] > 0)


@pytest.mark.parametrize("method", [pb.ANALYSIS_METHOD_SOBOL, pb.ANALYSIS_METHOD_DGSM, pb.ANALYSIS_METHOD_MORRIS])
def test_chunking_never_changes_the_answer(ishigami: ModelVersion, method: int) -> None:
    a = parse(request(method, 64), ishigami.model, Limits())
    sizes: list[int] = []
    small, _ = asyncio.run(run_analysis(a, ishigami, direct(ishigami, sizes), Limits(), chunk_rows=37))
    assert len(sizes) == -(-a.evaluations // 37) and max(sizes) == 37
    whole, _ = asyncio.run(run_analysis(a, ishigami, direct(ishigami), Limits()))
    assert small.keys() == whole.keys()
    for key in small:
        np.testing.assert_array_equal(small[key], whole[key], err_msg=key)


def test_an_analysis_stops_between_chunks_when_cancelled(ishigami: ModelVersion) -> None:
    a = parse(request(pb.ANALYSIS_METHOD_SOBOL, 64), ishigami.model, Limits())   # 320 evaluations
    control = CallControl()
    sizes: list[int] = []

    async def progress(done: int, total: int) -> None:
        if done >= 64:
            control.cancelled.set()   # the caller went away after the first chunk

    with pytest.raises(CancelledError):
        asyncio.run(run_analysis(a, ishigami, direct(ishigami, sizes), Limits(), control=control,
                                 progress=progress, chunk_rows=64))
    assert sizes == [64]


def test_constant_output_is_refused() -> None:
    with pytest.raises(FailedPreconditionError, match="does not vary"):
        analysis.check_outputs(np.ones(10))
    with pytest.raises(FailedPreconditionError, match="NaN or Inf at 1 of 3"):
        analysis.check_outputs(np.array([1.0, np.nan, 2.0]))

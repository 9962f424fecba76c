"""server/gsa without sockets: our samples and indices equal SALib's on the same samples (bit for
bit, however the sampling and the bootstrap are sliced), DGSM equals the mean squared gradient
of a tape in this process, chunking never changes the answer, every phase (sampling, evaluation,
analysis) stops at its next check once its caller goes away and checks often, an analysis'
memory stays within its up-front estimate, and bounds or outputs at the edge of float64 give
either INVALID_ARGUMENT or the right indices, never an overflow."""
from __future__ import annotations

import asyncio
import itertools
import time
import tracemalloc
import warnings
from typing import Any, Callable

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
from gradserve.server.core.errors import CancelledError, FailedPreconditionError, InvalidArgumentError
from gradserve.server.core.models import TensorSpec
from gradserve.server.core.requests import AnalysisRequest, FactorRequest
from gradserve.server.dataplane.gsa import analysis, problem, sampling
from gradserve.server.dataplane.gsa import run as gsa_run
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


# -- SALib's numbers, whatever the slices -------------------------------------------------------------

def spec_model(d: int, dtype: Any = np.float64) -> ModelFunction:
    """A model's specs only (for problem checks and the analysis, which never call it)."""
    return ModelFunction((TensorSpec("x", np.dtype(dtype), (None, d)),),
                         (TensorSpec("y", np.dtype(np.float64), (None, 1)),), lambda feed: feed)


def analysis_of(method: str, d: int, samples: int, *, resamples: int = 100, second_order: bool = False,
                levels: int = 4, bounds: tuple[float, ...] = (-3.0, 3.0), dist: str = "unif", seed: int = 7,
                dtype: Any = np.float64, limits: Limits | None = None) -> Any:
    factors = tuple(FactorRequest("", i, "", dist, bounds) for i in range(d))
    req = AnalysisRequest("m", method, factors, samples, seed=seed, resamples=resamples, second_order=second_order,
                          levels=levels)
    return check(req, spec_model(d, dtype), limits or Limits())


def salib_problem(d: int) -> dict[str, Any]:
    return {"num_vars": d, "names": [f"x{i}" for i in range(d)], "bounds": [[-3.0, 3.0]] * d}


def wiggly(x: np.ndarray) -> np.ndarray:
    """A test function with main effects and interactions in every factor."""
    out = np.sin(x[:, 0]) + 3 * np.sin(x[:, -1]) ** 2 + 0.2 * x[:, 0] * x[:, -1] ** 3
    return out + 0.7 * x[:, 1:].sum(axis=1) * np.cos(x[:, 0])


@pytest.mark.parametrize("slice_elements", [16, 1 << 20])
def test_sobol_equals_salib_in_any_slices(monkeypatch: pytest.MonkeyPatch, slice_elements: int) -> None:
    """Bootstrap index matrices drawn in slices of rows, estimators run on slices of resample
    columns and pairs: every float as SALib's sobol.analyze gives it on the same outputs."""
    monkeypatch.setattr(analysis, "SLICE_ELEMENTS", slice_elements)
    for d, n, r, second in itertools.product((1, 2, 5), (1, 3, 64, 129), (2, 3, 100), (False, True)):
        if second and d < 2:
            continue
        a = analysis_of("sobol", d, n, resamples=r, second_order=second, seed=n * 31 + d)
        seeds = sampling.seeds_for(a)
        y = wiggly(sampling.draw(a, seeds))
        ours = analysis.sobol_indices(a, y, seeds.bootstrap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SALib warns on constant resamples of tiny N
            theirs = salib_sobol.analyze(salib_problem(d), y, calc_second_order=second, num_resamples=r,
                                         seed=seeds.bootstrap)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{key} d={d} n={n} r={r} {second}")


@pytest.mark.parametrize("slice_elements", [16, 1 << 20])
def test_morris_equals_salib_in_any_slices(monkeypatch: pytest.MonkeyPatch, slice_elements: int) -> None:
    monkeypatch.setattr(analysis, "SLICE_ELEMENTS", slice_elements)
    monkeypatch.setattr(sampling, "SLICE_ELEMENTS", slice_elements)
    for d, n, r, levels in itertools.product((1, 2, 5) if slice_elements < 1024 else (1, 2, 5, 40), (2, 7, 64),
                                             (2, 100), (2, 6)):
        a = analysis_of("morris", d, n, resamples=r, levels=levels, seed=n * 31 + d)
        seeds = sampling.seeds_for(a)
        x = sampling.draw(a, seeds)
        want = morris_sampler.sample(salib_problem(d), n, num_levels=levels, seed=sampling.Seeds(a.seed).sampler)
        np.testing.assert_array_equal(x, want, err_msg=f"samples d={d} n={n} levels={levels}")
        y = wiggly(x)
        ours = analysis.morris_measures(a, x, y, seeds.bootstrap)
        theirs = salib_morris.analyze(salib_problem(d), x, y, num_resamples=r, num_levels=levels, seed=seeds.bootstrap)
        for key in ours:
            np.testing.assert_array_equal(ours[key], np.asarray(theirs[key], np.float64),
                                          err_msg=f"{key} d={d} n={n} r={r} levels={levels}")


@pytest.mark.parametrize("method, second_order", [("sobol", False), ("sobol", True), ("dgsm", False),
                                                  ("morris", False)])
def test_any_range_of_rows_equals_the_whole_matrix(method: str, second_order: bool) -> None:
    a = analysis_of(method, 4, 40, second_order=second_order)
    whole = sampling.draw(a, sampling.seeds_for(a))
    sampler = sampling.sampler_for(a, sampling.seeds_for(a))
    half = a.evaluations // 2
    bounds = [0, 1, 7, half, half + 1, a.evaluations]
    for start, stop in zip(bounds, bounds[1:]):
        np.testing.assert_array_equal(sampler.rows(start, stop), whole[start:stop])
    np.testing.assert_array_equal(sampler.rows(3, 9), whole[3:9])  # out of order: DGSM starts over


# -- deadlines and cancellation in every phase ----------------------------------------------------------

def version_of(name: str, d: int, fn: Callable[[tf.Tensor], tf.Tensor], dtype: Any = np.float64) -> ModelVersion:
    model = ModelFunction((TensorSpec("x", np.dtype(dtype), (None, d)),),
                          (TensorSpec("y", np.dtype(dtype), (None, 1)),), lambda feed: {"y": fn(feed["x"])})
    cfg = ServerConfig(engine=EngineConfig(xla="off", warmup=False, max_bucket=64))
    return ModelRepository(cfg, Compiler(cfg.engine)).load(name, 1, "test", lambda: model)


@pytest.fixture(scope="module")
def wide() -> ModelVersion:
    """64 float64 inputs, every one with a main effect and interactions."""
    return version_of("wide", 64, lambda x: (tf.reduce_sum(tf.sin(x), axis=1) + x[:, 0] * x[:, 63])[:, None])


class Phases:
    """The analysis' phase, from its progress: sampling until the first chunk is evaluated,
    evaluation until the last, analysis after."""

    def __init__(self) -> None:
        self.phase = "sampling"

    async def progress(self, done: int, total: int) -> None:
        if 0 < done < total:
            self.phase = "evaluation"
        elif done == total:
            self.phase = "analysis"


class CancelIn(CallControl):
    """A control whose caller goes away at the ``after``-th check of ``phase``; counts the checks
    and records the CPU time of the process at each."""

    def __init__(self, phases: Phases, phase: str | None, after: int = 3) -> None:
        super().__init__()
        self.phases, self.target, self.after = phases, phase, after
        self.seen: dict[str, int] = {}
        self.after_cancel = 0
        self.cpu: list[float] = []

    def check(self) -> None:
        self.cpu.append(time.process_time())
        phase = self.phases.phase
        self.seen[phase] = self.seen.get(phase, 0) + 1
        if self.cancelled.is_set():
            self.after_cancel += 1
        super().check()
        if phase == self.target and self.seen[phase] >= self.after:
            self.cancelled.set()  # the caller goes away just after this check passed


CANCEL_CASES = {"sobol": dict(samples=64, second_order=True), "morris": dict(samples=48), "dgsm": dict(samples=4096)}


@pytest.mark.parametrize("phase", ["sampling", "evaluation", "analysis"])
@pytest.mark.parametrize("method", ["sobol", "morris", "dgsm"])
def test_every_phase_stops_at_its_next_check(monkeypatch: pytest.MonkeyPatch, wide: ModelVersion, method: str,
                                             phase: str) -> None:
    """The caller goes away in the middle of a phase: the analysis stops at the very next check
    (none of its slices runs after), whichever phase it is in."""
    monkeypatch.setattr(analysis, "SLICE_ELEMENTS", 4096)
    monkeypatch.setattr(sampling, "SLICE_ELEMENTS", 4096)
    a = analysis_of(method, 64, **CANCEL_CASES[method])  # type: ignore[arg-type]
    phases = Phases()
    control = CancelIn(phases, phase)
    with pytest.raises(CancelledError):
        asyncio.run(run_analysis(a, wide, direct(wide), Limits(), control=control, progress=phases.progress,
                                 chunk_rows=256))
    assert control.seen.get(phase, 0) >= control.after, control.seen  # it was cancelled in that phase
    assert control.after_cancel == 1, control.seen  # and the first check after raised


@pytest.mark.parametrize("method", ["sobol", "morris", "dgsm"])
def test_checks_come_often_in_every_phase(wide: ModelVersion, method: str) -> None:
    """A sizable analysis with the default slices checks its control at least every 0.5 s of
    the process' CPU time (every slice is a few milliseconds of work), in every phase."""
    big = {"sobol": dict(samples=128, second_order=True, resamples=400), "morris": dict(samples=256),
           "dgsm": dict(samples=16384)}[method]
    a = analysis_of(method, 64, **big)  # type: ignore[arg-type]
    phases = Phases()
    control = CancelIn(phases, None)
    asyncio.run(run_analysis(a, wide, direct(wide), Limits(), control=control, progress=phases.progress))
    gaps = np.diff(control.cpu)
    assert control.seen.get("analysis", 0) > 1, control.seen
    assert gaps.max() < 0.5, (gaps.max(), control.seen)


def test_a_long_phase_repeats_its_progress(monkeypatch: pytest.MonkeyPatch, ishigami: ModelVersion) -> None:
    """While the bootstrap runs (no evaluations to report), the last progress is sent again every
    HEARTBEAT_S: the stream carries data, so the client's keepalive pings stay welcome."""
    monkeypatch.setattr(gsa_run, "HEARTBEAT_S", 0.001)
    a = parse(request(pb.ANALYSIS_METHOD_SOBOL, 4096, resamples=2000), ishigami.model, Limits())
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))

    asyncio.run(run_analysis(a, ishigami, direct(ishigami), Limits(), progress=progress))
    assert seen.count((a.evaluations, a.evaluations)) > 1, seen[-3:]
    assert all(x[0] <= y[0] for x, y in zip(seen, seen[1:]))


# -- memory --------------------------------------------------------------------------------------------

def test_every_analysis_within_the_default_limits_fits_the_default_memory_budget() -> None:
    """The estimate of every analysis the default limits accept (every method, dimension and
    resamples at the largest samples they allow) is below the default memory budget, so a lone
    analysis is never refused; measured RSS stays within it (tests/integration/test_gsa_resources.py)."""
    limits = Limits()
    worst = 0
    for method in problem.METHODS:
        for d in (1, 2, 3, 4, 8, 16, 32, 64, 256, 1000, 1024):
            for second in ((False, True) if method == "sobol" and d > 1 else (False,)):
                per = problem.evaluations_for(method, 1, d, second)
                top = min(limits.max_gsa_evaluations // per, limits.max_elements // (per * d))
                for r in (2, 10, 100, 1000, problem.MAX_RESAMPLES):
                    n = min(top, limits.max_elements // r)
                    if n >= 2:
                        worst = max(worst, problem.memory_for(method, n, d, r, second))
    assert worst < limits.max_inflight_request_bytes, worst / 2**20
    # The case of the issue: Sobol' on 4 inputs with 671,088 samples (5.24 GB before).
    assert problem.memory_for("sobol", 671088, 4, 100) < 640 * 2**20


@pytest.mark.parametrize("method, shape", [("sobol", dict(samples=32768, resamples=100)),
                                           ("sobol", dict(samples=16, resamples=5000, second_order=True)),
                                           ("morris", dict(samples=2048)),
                                           ("dgsm", dict(samples=32768))])
def test_memory_of_sampling_and_analysis_is_within_the_estimate(wide: ModelVersion, method: str,
                                                                shape: dict[str, Any]) -> None:
    """What NumPy allocates while an analysis runs (traced) stays within its up-front estimate,
    less what the estimate keeps for the engine and the allocator. SALib's whole-matrix
    bootstrap alone took 8 x N x resamples bytes several times over."""
    a = analysis_of(method, 64 if method != "sobol" or shape["samples"] < 100 else 3, **shape)
    model = wide if a.dimension == 64 else version_of("three", 3, lambda x: ishigami_tf(x))
    tracemalloc.start()
    try:
        asyncio.run(run_analysis(a, model, direct(model), Limits()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= a.nbytes - problem.OVERHEAD_BYTES, (peak / 2**20, a.nbytes / 2**20)


# -- the edges of float64 -------------------------------------------------------------------------------

@pytest.mark.parametrize("dist, params, dtype, match", [
    ("unif", (-1e308, 1e308), np.float64, "wider than float64"),
    ("triang", (-1e308, 1e308, 0.5), np.float64, "wider than float64"),
    ("norm", (1e308, 1e307), np.float64, "beyond float64"),
    ("lognorm", (700.0, 2.0), np.float64, "beyond float64"),
    ("unif", (0.0, 1e39), np.float32, "beyond the range of input 'x' \\(float32"),
    ("norm", (0.0, 1e38), np.float32, "beyond the range of input 'x' \\(float32"),
    ("unif", (0.0, 1e10), np.int32, "beyond the range of input 'x' \\(int32"),
    ("unif", (-40000.0, 0.0), np.int16, "beyond the range of input 'x' \\(int16"),
])
def test_bounds_whose_samples_overflow_are_invalid_argument(dist: str, params: tuple[float, ...], dtype: Any,
                                                            match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        analysis_of("sobol", 2, 16, bounds=params, dist=dist, dtype=dtype)


@pytest.fixture(scope="module")
def linear64() -> ModelVersion:
    """y = 2 x0 - 3 x1 in float64."""
    return version_of("linear64", 2, lambda x: (2.0 * x[:, :1] - 3.0 * x[:, 1:]))


def test_dgsm_with_bounds_of_1e160_is_computed(linear64: ModelVersion) -> None:
    """(high - low)^2 overflows float64 and Var f too, their ratio does not: the indices on
    [-1e160, 1e160] are those on [-1, 1] (the same points, scaled), vi is exact."""
    huge = analysis_of("dgsm", 2, 1024, bounds=(-1e160, 1e160))
    unit = analysis_of("dgsm", 2, 1024, bounds=(-1.0, 1.0))
    big, _ = asyncio.run(run_analysis(huge, linear64, direct(linear64), Limits()))
    small, _ = asyncio.run(run_analysis(unit, linear64, direct(linear64), Limits()))
    np.testing.assert_allclose(big["vi"], [4.0, 9.0], rtol=1e-12)
    for key in ("dgsm", "dgsm_conf"):
        np.testing.assert_allclose(big[key], small[key], rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(big["dgsm"], 12 * np.array([4.0, 9.0]) / (np.pi**2 * 13), rtol=0.01)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("method", ["sobol", "morris", "dgsm"])
def test_outputs_near_the_edges_of_float64_give_the_scaled_indices(method: str, scale: float) -> None:
    """Outputs of 1e200 (their squares overflow) or 1e-200 (underflow): Sobol' indices and DGSM's
    dgsm are those of the unscaled model, Morris's effects and DGSM's vi scale with the output
    (vi = inf where (1e200)^2 is beyond float64, not an error)."""
    ref = version_of("ref", 3, ishigami_tf)
    scaled = version_of("scaled", 3, lambda x: scale * ishigami_tf(x))
    a = parse(request({"sobol": pb.ANALYSIS_METHOD_SOBOL, "morris": pb.ANALYSIS_METHOD_MORRIS,
                       "dgsm": pb.ANALYSIS_METHOD_DGSM}[method], 256), ref.model, Limits())
    want, _ = asyncio.run(run_analysis(a, ref, direct(ref), Limits()))
    got, _ = asyncio.run(run_analysis(a, scaled, direct(scaled), Limits()))
    for key, value in got.items():
        if method == "morris":  # in units of the output
            atol = 1e-12 * scale * np.abs(want[key]).max()
            np.testing.assert_allclose(value, want[key] * scale, rtol=1e-9, atol=atol, err_msg=key)
        elif key in ("vi", "vi_std"):  # squares of the output's units: 1e400 is inf, 1e-400 is 0
            with np.errstate(over="ignore", under="ignore"):
                expected = want[key] * scale * scale
            np.testing.assert_allclose(value, expected, rtol=1e-9, err_msg=key)
        else:
            np.testing.assert_allclose(value, want[key], rtol=1e-9, atol=1e-12, err_msg=key)

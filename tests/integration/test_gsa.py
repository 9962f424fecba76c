"""Global sensitivity analysis through a real server, the SDK, the async SDK and the CLI.

Models are built here and served from a model dir: the Ishigami function and the Sobol' g-function
as SavedModels (a tf.Module with a tf.function signature; Keras safe mode refuses Lambda), a linear
Keras model, a float64 linear model, a two-input model and an integer-input model. Indices are
checked against closed forms; bounds at the edge of float64 give INVALID_ARGUMENT or the right
indices; analyses past the memory budget are RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import gradserve

PI = math.pi
A, B = 7.0, 0.1
#: The server's limits: the Ishigami Sobol' test runs exactly at the evaluation limit, the
#: g-function exactly at the dimension limit.
MAX_EVALUATIONS = 8192 * 5
MAX_DIMENSION = 6
G_A = (0.0, 0.5, 3.0, 9.0, 99.0, 99.0)
LINEAR_W = (1.0, -2.0, 3.0, 0.5)


def _save_module(path: str, fn: Any, signature: list[Any]) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(fn, input_signature=signature)
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})


def build_models(root: str) -> None:
    import keras
    import tensorflow as tf

    def ishigami(x: Any) -> dict[str, Any]:
        y = tf.sin(x[:, 0]) + A * tf.sin(x[:, 1]) ** 2 + B * x[:, 2] ** 4 * tf.sin(x[:, 0])
        return {"y": y[:, None]}

    def g_function(x: Any) -> dict[str, Any]:
        a = tf.constant(G_A, tf.float32)
        return {"y": tf.reduce_prod((tf.abs(4.0 * x - 2.0) + a) / (1.0 + a), axis=1, keepdims=True)}

    def two_inputs(a: Any, b: Any) -> dict[str, Any]:
        return {"y": a[:, :1] + 2.0 * a[:, 1:] + 3.0 * b}

    def counts(n: Any) -> dict[str, Any]:
        return {"y": tf.reduce_sum(tf.cast(n, tf.float32) ** 2, axis=1, keepdims=True)}

    def linear64(x: Any) -> dict[str, Any]:
        return {"y": 2.0 * x[:, :1] - 3.0 * x[:, 1:]}

    spec = tf.TensorSpec
    _save_module(os.path.join(root, "ishigami", "1"), ishigami, [spec([None, 3], tf.float32, name="x")])
    _save_module(os.path.join(root, "gfun", "1"), g_function, [spec([None, 6], tf.float32, name="x")])
    _save_module(os.path.join(root, "two", "1"), two_inputs,
                 [spec([None, 2], tf.float32, name="a"), spec([None, 1], tf.float32, name="b")])
    _save_module(os.path.join(root, "counts", "1"), counts, [spec([None, 2], tf.int32, name="n")])
    _save_module(os.path.join(root, "linear64", "1"), linear64, [spec([None, 2], tf.float64, name="x")])
    x = keras.Input((4,), name="x")
    dense = keras.layers.Dense(1, name="y")
    model = keras.Model(x, dense(x))
    dense.set_weights([np.array(LINEAR_W, np.float32)[:, None], np.array([0.25], np.float32)])
    model.save(os.path.join(root, "linear.keras"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("gsa_models"))
    build_models(root)
    return root


@pytest.fixture(scope="module")
def server(start_server: Any, models: str) -> Any:
    from gradserve.server.config import EngineConfig, Limits, ServerConfig

    return start_server(ServerConfig(model_dir=models, engine=EngineConfig(xla="off"),
                                     limits=Limits(max_gsa_evaluations=MAX_EVALUATIONS,
                                                   max_gsa_dimension=MAX_DIMENSION)))


@pytest.fixture()
def c(server: Any) -> Any:
    with gradserve.Client(server.address, timeout=120) as client:
        yield client


ISHIGAMI = [(-PI, PI)] * 3


def ishigami_exact() -> dict[str, np.ndarray]:
    v1 = 0.5 * (1 + B * PI**4 / 5) ** 2
    v2 = A**2 / 8
    v13 = B**2 * PI**8 * (1 / 18 - 1 / 50)
    var = v1 + v2 + v13
    vi = np.array([0.5 * (1 + 2 * B * PI**4 / 5 + B**2 * PI**8 / 9), A**2 / 2, 8 * B**2 * PI**6 / 7])
    return {"S1": np.array([v1, v2, 0.0]) / var, "ST": np.array([v1 + v13, v2, v13]) / var, "vi": vi,
            "var": np.array(var)}


def test_ishigami_sobol_matches_the_closed_form(c: Any) -> None:
    seen: list[tuple[int, int]] = []
    r = c.sobol("ishigami", ISHIGAMI, samples=8192, seed=1, progress=lambda d, t: seen.append((d, t)))
    exact = ishigami_exact()
    np.testing.assert_allclose(exact["S1"], [0.3139, 0.4424, 0.0], atol=1e-4)
    np.testing.assert_allclose(exact["ST"], [0.5576, 0.4424, 0.2437], atol=1e-4)
    for key in ("S1", "ST"):
        err = np.abs(r[key] - exact[key])
        assert np.all(err <= np.maximum(r[key + "_conf"], 0.01)), (key, r[key], r[key + "_conf"])
        assert np.all(err < 0.03), (key, r[key])
    assert r.names == ["x[0]", "x[1]", "x[2]"] and r.evaluations == MAX_EVALUATIONS   # at the limit
    assert seen[0] == (0, MAX_EVALUATIONS) and seen[-1] == (MAX_EVALUATIONS, MAX_EVALUATIONS)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert "S2" not in r and set(r) == {"S1", "S1_conf", "ST", "ST_conf", "names", "evaluations"}


def test_same_seed_same_answer(c: Any) -> None:
    first = c.sobol("ishigami", ISHIGAMI, samples=512, seed=5, second_order=True)
    again = c.sobol("ishigami", ISHIGAMI, samples=512, seed=5, second_order=True)
    other = c.sobol("ishigami", ISHIGAMI, samples=512, seed=6, second_order=True)
    for key in ("S1", "S1_conf", "ST", "ST_conf", "S2", "S2_conf"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["S1"], other["S1"])
    assert first["S2"].shape == (3, 3) and np.isnan(first["S2"][1, 0])
    assert abs(first["S2"][0, 2] - ishigami_exact()["ST"][2]) < 0.1   # S13 is all of x3's effect
    assert first.evaluations == 512 * 8


def test_ishigami_dgsm_matches_the_closed_form(c: Any) -> None:
    r = c.dgsm("ishigami", ISHIGAMI, samples=8192, seed=2)
    exact = ishigami_exact()
    np.testing.assert_allclose(exact["vi"], [7.72, 24.5, 10.99], rtol=1e-3)
    np.testing.assert_allclose(r["vi"], exact["vi"], rtol=0.01)
    # dgsm = vi (2 pi)^2 / (pi^2 Var f) bounds the total index from above.
    np.testing.assert_allclose(r["dgsm"], 4 * exact["vi"] / exact["var"], rtol=0.03)
    assert np.all(r["dgsm"] >= exact["ST"]) and np.all(r["dgsm_conf"] > 0) and np.all(r["vi_std"] > 0)
    assert r.evaluations == 8192


def test_g_function_sobol_matches_the_closed_form(c: Any) -> None:
    a = np.array(G_A)
    v = 1 / (3 * (1 + a) ** 2)
    var = np.prod(1 + v) - 1
    s1 = v / var
    st = v * np.array([np.prod(np.delete(1 + v, i)) for i in range(6)]) / var
    r = c.sobol("gfun", [(0.0, 1.0)] * MAX_DIMENSION, samples=4096, seed=3)   # at the dimension limit
    np.testing.assert_allclose(r["S1"], s1, atol=0.03)
    np.testing.assert_allclose(r["ST"], st, atol=0.03)
    assert np.all(np.abs(r["S1"] - s1) <= np.maximum(2 * r["S1_conf"], 0.01))


def test_linear_model_dgsm_and_morris_are_exact(c: Any) -> None:
    w = np.array(LINEAR_W)
    bounds = [(0.0, 1.0), (-1.0, 1.0), (2.0, 5.0), (0.0, 10.0)]
    width = np.array([h - lo for lo, h in bounds])
    r = c.dgsm("linear", bounds, samples=1024, seed=0)
    np.testing.assert_allclose(r["vi"], w**2, rtol=1e-6)
    np.testing.assert_allclose(r["vi_std"], 0.0, atol=1e-5)
    var = np.sum(w**2 * width**2 / 12)
    np.testing.assert_allclose(r["dgsm"], w**2 * width**2 / (PI**2 * var), rtol=0.02)
    m = c.morris("linear", bounds, trajectories=20, levels=4, seed=0)
    # SALib's elementary effects are per unit of the normalised range: w * (high - low).
    np.testing.assert_allclose(m["mu"], w * width, rtol=1e-5)
    np.testing.assert_allclose(m["mu_star"], np.abs(w) * width, rtol=1e-5)
    np.testing.assert_allclose(m["sigma"], 0.0, atol=1e-4)
    assert m.evaluations == 20 * 5


def test_problem_dict_with_distributions(c: Any) -> None:
    w = np.array(LINEAR_W)
    problem = {"names": ["u", "n", "ln", "tri"], "bounds": [[0, 1], [0, 0.5], [0, 0.3], [0, 2, 0.25]],
               "dists": ["unif", "norm", "lognorm", "triang"]}
    variances = np.array([1 / 12, 0.25, (math.exp(0.09) - 1) * math.exp(0.09), (4 + 0.25 - 1) / 18])
    exact = w**2 * variances / np.sum(w**2 * variances)
    r = c.sobol("linear", problem=problem, samples=4096, seed=4)
    assert r.names == ["u", "n", "ln", "tri"]
    np.testing.assert_allclose(r["S1"], exact, atol=0.02)
    np.testing.assert_allclose(r["ST"], exact, atol=0.02)


def test_several_inputs_by_name(c: Any) -> None:
    r = c.sobol("two", {"a": [(0, 1), (0, 1)], "b": [(0, 1)]}, samples=2048, seed=0)
    assert r.names == ["a[0]", "a[1]", "b[0]"]
    np.testing.assert_allclose(r["S1"], np.array([1, 4, 9]) / 14, atol=0.02)
    frame = r.to_frame()
    assert list(frame.index) == r.names and list(frame.columns) == ["S1", "S1_conf", "ST", "ST_conf"]
    text = r.table()
    assert all(name in text for name in r.names) and "±" in text and str(r) == text


def test_output_and_target_select_the_value(c: Any) -> None:
    whole = c.sobol("two", {"a": [(0, 1), (0, 1)], "b": [(0, 1)]}, samples=256, seed=0, output="y", target=0)
    np.testing.assert_allclose(whole["S1"], np.array([1, 4, 9]) / 14, atol=0.05)
    with pytest.raises(gradserve.InvalidArgument, match="output_element"):
        c.sobol("two", {"a": [(0, 1), (0, 1)], "b": [(0, 1)]}, samples=16, target=1)
    with pytest.raises(gradserve.NotFound, match="unknown output"):
        c.sobol("two", {"a": [(0, 1), (0, 1)], "b": [(0, 1)]}, samples=16, output="nope")


@pytest.mark.parametrize("bounds, match", [
    ([(1.0, 1.0), (0, 1), (0, 1)], "low < high"),
    ([(0, float("inf")), (0, 1), (0, 1)], "finite"),
    ([(0, 1), (0, 1)], "elements \\[2\\] of input 'x' have no factor"),
    ([(0, 1)] * 4, "factors\\[3\\].index: 3 is out of range"),
    ([(0, 1)] * (MAX_DIMENSION + 1), "more than max_gsa_dimension=6"),
])
def test_bad_bounds_are_invalid_argument(c: Any, bounds: Any, match: str) -> None:
    with pytest.raises(gradserve.InvalidArgument, match=match):
        c.sobol("ishigami", bounds, samples=16)


def test_evaluation_limit_edge(c: Any) -> None:
    with pytest.raises(gradserve.InvalidArgument, match=f"{MAX_EVALUATIONS + 1} model evaluations, more than "
                                                        f"max_gsa_evaluations={MAX_EVALUATIONS}"):
        c.dgsm("linear", [(0, 1)] * 4, samples=MAX_EVALUATIONS + 1)
    with pytest.raises(gradserve.InvalidArgument, match="max_gsa_evaluations"):
        c.sobol("ishigami", ISHIGAMI, samples=8193)   # 5 evaluations more than the limit
    assert c.dgsm("linear", [(0, 1)] * 4, samples=MAX_EVALUATIONS, seed=0).evaluations == MAX_EVALUATIONS


def test_model_and_input_errors(c: Any) -> None:
    with pytest.raises(gradserve.NotFound, match="nope"):
        c.sobol("nope", ISHIGAMI, samples=16)
    with pytest.raises(gradserve.NotFound, match="unknown input 'c'"):
        c.sobol("two", {"a": [(0, 1), (0, 1)], "c": [(0, 1)]}, samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="several inputs"):
        c.sobol("two", [(0, 1)] * 3, samples=16)
    with pytest.raises(gradserve.FailedPrecondition, match="int32, which cannot be differentiated"):
        c.dgsm("counts", [(0, 5), (0, 5)], samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="uniform factors only"):
        c.dgsm("linear", problem={"names": list("abcd"), "bounds": [[0, 1]] * 4,
                                  "dists": ["norm", "unif", "unif", "unif"]}, samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="exactly one"):
        c.sobol("linear", samples=16)
    # Sobol' of an integer input samples the nearest integers.
    r = c.sobol("counts", [(0, 5), (0, 5)], samples=1024, seed=0)
    np.testing.assert_allclose(r["S1"], [0.5, 0.5], atol=0.05)


def test_bounds_at_the_edge_of_float64(c: Any) -> None:
    """Bounds whose square (DGSM's (high - low)^2) or whose samples overflow: the right indices
    where the model takes them (float64), INVALID_ARGUMENT where it cannot (float32), or where the
    range itself overflows. It was INTERNAL (OverflowError in (high - low)**2)."""
    huge = c.dgsm("linear64", [(-1e160, 1e160)] * 2, samples=1024, seed=0)
    unit = c.dgsm("linear64", [(-1.0, 1.0)] * 2, samples=1024, seed=0)
    np.testing.assert_allclose(huge["vi"], [4.0, 9.0], rtol=1e-12)
    np.testing.assert_allclose(huge["dgsm"], unit["dgsm"], rtol=1e-9)
    np.testing.assert_allclose(huge["dgsm"], 12 * np.array([4.0, 9.0]) / (PI**2 * 13), rtol=0.01)
    with pytest.raises(gradserve.InvalidArgument, match="beyond the range of input 'x' \\(float32"):
        c.dgsm("linear", [(-1e160, 1e160)] * 4, samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="wider than float64"):
        c.dgsm("linear64", [(-1e308, 1e308)] * 2, samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="beyond float64"):
        c.sobol("linear64", problem={"names": ["a", "b"], "bounds": [[700, 2], [0, 1]], "dists": ["lognorm", "unif"]},
                samples=16)
    with pytest.raises(gradserve.InvalidArgument, match="beyond the range of input 'n' \\(int32"):
        c.sobol("counts", [(0, 1e10), (0, 5)], samples=16)


def test_analyses_past_the_memory_budget_are_resource_exhausted(start_server: Any, models: str) -> None:
    """An analysis holds its estimated memory against --max-inflight-request-bytes while it runs:
    one that does not fit beside another is RESOURCE_EXHAUSTED, and so is one bigger than the
    whole budget (refused before anything is drawn); once the first ends its memory is free."""
    from gradserve.server.config import EngineConfig, Limits, ServerConfig
    from gradserve.server.dataplane.gsa.problem import memory_for

    held = dict(samples=2048, second_order=True, resamples=10000)   # seconds of bootstrap
    first = memory_for("sobol", 2048, 6, 10000, True)
    small = memory_for("sobol", 64, 6, 100)
    budget = first + small // 2
    srv = start_server(ServerConfig(model_dir=models, engine=EngineConfig(xla="off"),
                                    limits=Limits(max_inflight_request_bytes=budget)))
    memory = srv.server.envelope.memory
    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            with gradserve.Client(srv.address, timeout=300) as c:
                c.sobol("gfun", [(0.0, 1.0)] * 6, seed=0, **held)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        _wait_for(lambda: memory.held >= first, lambda: f"held {memory.held} of {first}")
        with gradserve.Client(srv.address, timeout=120) as c:
            with pytest.raises(gradserve.ResourceExhausted, match="--max-inflight-request-bytes"):
                c.sobol("gfun", [(0.0, 1.0)] * 6, samples=64, seed=0)
    finally:
        thread.join(300)
    assert not errors, errors
    _wait_for(lambda: memory.held == 0, lambda: f"held {memory.held}")
    with gradserve.Client(srv.address, timeout=120) as c:
        assert c.sobol("gfun", [(0.0, 1.0)] * 6, samples=64, seed=0).evaluations == 64 * 8
        with pytest.raises(gradserve.ResourceExhausted, match="needs about .* MiB"):
            c.sobol("gfun", [(0.0, 1.0)] * 6, samples=4096, seed=0, second_order=True, resamples=10000)


def _wait_for(condition: Any, describe: Any, timeout: float = 120.0) -> None:
    """Poll ``condition`` (a state of the server, not a timing) until it holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, describe()
        time.sleep(0.01)


def test_deadline_stops_the_analysis(c: Any) -> None:
    with pytest.raises(gradserve.DeadlineExceeded):
        c.sobol("ishigami", ISHIGAMI, samples=8192, timeout=0.001)
    assert c.sobol("ishigami", ISHIGAMI, samples=64, seed=0).evaluations == 320   # the server is fine


def test_async_client(server: Any) -> None:
    async def main() -> tuple[Any, Any, Any, list[tuple[int, int]]]:
        seen: list[tuple[int, int]] = []
        async with gradserve.AsyncClient(server.address, timeout=120) as ac:
            s = await ac.sobol("ishigami", ISHIGAMI, samples=1024, seed=1, progress=lambda d, t: seen.append((d, t)))
            d = await ac.dgsm("linear", [(0, 1)] * 4, samples=256, seed=0)
            m = await ac.morris("linear", [(0, 1)] * 4, trajectories=8, seed=0)
            with pytest.raises(gradserve.NotFound):
                await ac.dgsm("nope", ISHIGAMI, samples=16)
        return s, d, m, seen

    s, d, m, seen = asyncio.run(main())
    with gradserve.Client(server.address, timeout=120) as c:
        np.testing.assert_array_equal(s["S1"], c.sobol("ishigami", ISHIGAMI, samples=1024, seed=1)["S1"])
    np.testing.assert_allclose(d["vi"], np.array(LINEAR_W) ** 2, rtol=1e-6)
    np.testing.assert_allclose(m["mu"], LINEAR_W, rtol=1e-5)
    assert seen[-1] == (1024 * 5, 1024 * 5)


def test_cli_sensitivity_prints_a_table_and_plots(server: Any, tmp_path: Any) -> None:
    png = tmp_path / "gsa.png"
    problem = tmp_path / "problem.json"
    problem.write_text('{"names": ["a", "b", "c"], "bounds": [[-3.14159, 3.14159], [-3.14159, 3.14159], '
                       '[-3.14159, 3.14159]]}')
    cmd = [sys.executable, "-m", "gradserve", "sensitivity", "ishigami", "--target", server.address]
    out = subprocess.run(cmd + ["--method", "sobol", "--bounds=-3.14159:3.14159,-3.14159:3.14159,-3.14159:3.14159",
                                "--samples", "512", "--seed", "0", "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "x[0]" in out.stdout and "S1" in out.stdout and "ST" in out.stdout and "±" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run(cmd + ["--method", "dgsm", "--problem", str(problem), "--samples", "256"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "vi" in out.stdout and "dgsm" in out.stdout and "\nb " in out.stdout
    out = subprocess.run(cmd + ["--method", "morris", "--bounds", "0:1", "--samples", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error" in out.stderr and "no factor" in out.stderr


def test_serve_flags_set_the_gsa_limits() -> None:
    from gradserve.server.config import Limits
    from gradserve.server.process import cli

    args = cli.build_parser().parse_args(["serve", "--max-gsa-evaluations", "40960", "--max-gsa-dimension", "6"])
    limits = cli._limits(args)
    assert (limits.max_gsa_evaluations, limits.max_gsa_dimension) == (MAX_EVALUATIONS, MAX_DIMENSION)
    default = cli._limits(cli.build_parser().parse_args(["serve"]))
    assert (default.max_gsa_evaluations, default.max_gsa_dimension) == (Limits().max_gsa_evaluations,
                                                                        Limits().max_gsa_dimension)
